"""What the study held equal, as run: per model folder whether its plans were aligned with the encoder's
pretraining (and which encoder, which seeds), and per pretraining run its budget (steps, volumes, wall time).

Read from the ``nnssl`` section the trainers write into each model folder's ``plans.json`` (``alignment``,
``pretrained``, ``seeds``) and from the pretraining run folder it names (``config.json``, ``log.csv``).
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from nnssl.plans_variants import PLANS_KEY
from nnssl.io import load_json
from nnssl.paths import nnunet_results

NO_ENCODER = "no encoder (scratch)"


def _settings(folder: Path, configuration: str) -> dict[str, Any]:
    try:
        return load_json(folder / "plans.json")["configurations"][configuration].get(PLANS_KEY) or {}
    except (OSError, ValueError, KeyError):
        return {}


def alignment_rows(runs: list[Any]) -> list[dict[str, Any]]:
    """One row per model folder of ``runs`` (report FoldRuns): aligned or not, encoder, fingerprint, seeds."""
    rows = []
    for key in sorted({(r.task, r.dataset, r.method, r.trainer, r.plans, r.configuration) for r in runs}):
        task, dataset, method, trainer, plans, configuration = key
        settings = _settings(nnunet_results() / dataset / f"{trainer}__{plans}__{configuration}", configuration)
        pretrained, alignment = settings.get("pretrained") or {}, settings.get("alignment") or {}
        rows.append({
            "task": task, "method": method, "plans": plans,
            "aligned": alignment.get("status", NO_ENCODER if not pretrained else "not checked"),
            "encoder": pretrained.get("encoder", ""),
            "encoder_sha256": (pretrained.get("checkpoint_sha256") or "")[:12],
            "seeds": " ".join(f"{fold}:{seed}" for fold, seed in sorted((settings.get("seeds") or {}).items())),
            "differences": "; ".join(alignment.get("differences", [])),
        })
    return rows


def budget_rows(runs: list[Any]) -> list[dict[str, Any]]:
    """One row per pretraining run the model folders of ``runs`` started from: its budget as run."""
    run_folders: dict[Path, str] = {}
    for r in runs:
        settings = _settings(nnunet_results() / r.dataset / f"{r.trainer}__{r.plans}__{r.configuration}",
                             r.configuration)
        path = (settings.get("pretrained") or {}).get("path")
        if path:
            run_folders.setdefault(Path(path).parent, r.method)
    return [_budget(folder, method) for folder, method in sorted(run_folders.items(), key=lambda i: i[1])]


def _budget(folder: Path, method: str) -> dict[str, Any]:
    row: dict[str, Any] = {"method": method, "run": folder.name, "steps": "", "volumes_per_step": "",
                           "volumes_seen": "", "crop": "", "wall_time_h": "", "folder": str(folder)}
    try:
        config = load_json(folder / "config.json")
        with open(folder / "log.csv", newline="", encoding="utf-8") as f:
            log = list(csv.DictReader(f))
    except (OSError, ValueError):
        return row  # the run folder moved or was deleted: the table says what is unknown
    per_step = int(config["batch_size"]) * int(config.get("accumulate", 1)) * int(config.get("world_size", 1))
    steps = int(log[-1]["step"]) if log else 0
    # each row's samples_per_s covers the log_every steps since the previous row, so their times add up to the
    # wall time of training (data loading and checkpoints included, start-up and pauses between resumes not)
    seconds = sum(per_step * int(config.get("log_every", 1)) / float(row_["samples_per_s"]) for row_ in log
                  if float(row_.get("samples_per_s") or 0) > 0)
    crop = config.get("patch_size")
    row.update({"steps": steps, "volumes_per_step": per_step, "volumes_seen": steps * per_step,
                "crop": "x".join(map(str, crop)) if crop else "backbone default", "wall_time_h": seconds / 3600})
    return row


def protocol_sections(tables: dict[str, list[dict]]) -> list[str]:
    """The report's markdown for :func:`alignment_rows` and :func:`budget_rows` tables."""
    from nnssl.analysis.tables import markdown_table

    parts = ["## What the study held equal\n",
             "Alignment: whether each model folder's plans gave the encoder the spacing and CT intensity numbers "
             "it was pretrained with (the trainer's check; `nnssl_align_plans` makes aligned plans), which "
             "encoder of the run fine-tuned, its fingerprint and the seed of each fold (`alignment.csv`)\n",
             markdown_table(tables["alignment"], ["task", "method", "plans", "aligned", "encoder", "encoder_sha256",
                                                  "seeds", "differences"]) if tables["alignment"] else "None.\n",
             "Pretraining budget as run: optimizer steps, volumes per step and seen, crop, and wall time (from "
             "the run's `log.csv`) of each pretraining run the models started from (`budget.csv`)\n",
             markdown_table(tables["budget"], ["method", "run", "steps", "volumes_per_step", "volumes_seen", "crop",
                                               "wall_time_h"]) if tables["budget"] else "None.\n"]
    return parts
