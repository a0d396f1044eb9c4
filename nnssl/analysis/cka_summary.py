"""The report's feature-reuse section: what ``nnssl_cka`` wrote (``cka.json``) for few- vs many-shot models.

The study compares, per task and method, the model fine-tuned on a few-shot fold with the one fine-tuned on
its many-shot base fold, layer by layer (Jiang & Veeraraghavan 2026: high same-layer CKA = the few-shot model
reuses the features the many-shot model learns). Per task x method x shot setting the section gives the mean
same-layer CKA of every encoder stage and decoder block over the comparisons found (base folds, seeds), and
per task the heatmaps of the methods with the highest and the lowest mean reuse.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from nnssl.analysis import plots
from nnssl.analysis.activations import DECODER_LAYERS, ENCODER_LAYERS
from nnssl.analysis.results import (folder_method, load_fewshot, nnssl_trainer_classes, parse_model_folder,
                                    shot_setting)
from nnssl.analysis.tables import markdown_table
from nnssl.errors import NnsslError
from nnssl.io import load_json
from nnssl.paths import nnunet_preprocessed

log = logging.getLogger(__name__)

LAYERS = ENCODER_LAYERS + DECODER_LAYERS


def read_comparisons(cka_dir: Path) -> list[dict[str, Any]]:
    """One entry per ``cka.json`` under ``cka_dir`` comparing two trained models of one model folder:
    task, method, shot (of the first model), the comparison itself (``cka.json``'s first)."""
    trainers = nnssl_trainer_classes()
    found = []
    for path in sorted(cka_dir.rglob("cka.json")):
        try:
            result = load_json(path)
            models, comparison = result["models"], result["comparisons"][0]
            folder = parse_model_folder(Path(models[0]["folder"]))
        except (ValueError, KeyError, IndexError, NnsslError) as err:
            log.warning("nnssl_report: %s is not an nnssl_cka result (%s); skipped", path, err)
            continue
        if any(m.get("kind") != "trained" for m in models[:2]) or models[0]["folder"] != models[1]["folder"]:
            continue  # not a few- vs many-shot comparison of one model folder
        method = folder_method(folder, trainers)
        shots = [shot_setting(str(m["fold"]), _fewshot(folder.dataset)) for m in models[:2]]
        found.append({"task": folder.dataset, "method": method, "shot": f"{shots[0]} vs {shots[1]}",
                      "comparison": comparison, "path": path})
    return found


def _fewshot(dataset: str) -> dict[str, dict]:
    try:
        return load_fewshot(nnunet_preprocessed() / dataset)
    except NnsslError:
        return {}


def cka_rows(comparisons: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per task x method x shot pair: mean same-layer CKA per layer, over encoder, decoder and all layers."""
    groups: dict[tuple, list[dict]] = {}
    for entry in comparisons:
        groups.setdefault((entry["task"], entry["method"], entry["shot"]), []).append(entry["comparison"])
    rows = []
    for (task, method, shot), group in groups.items():
        row: dict[str, Any] = {"task": task, "method": method, "shot": shot, "comparisons": len(group)}
        for layer in LAYERS:
            values = [c["diagonal"][layer] for c in group if layer in c["diagonal"]]
            row[layer] = float(np.mean(values)) if values else math.nan
        for name, layers in (("encoder_mean", ENCODER_LAYERS), ("decoder_mean", DECODER_LAYERS), ("mean", LAYERS)):
            values = [row[layer] for layer in layers if not math.isnan(row[layer])]
            row[name] = float(np.mean(values)) if values else math.nan
        rows.append(row)
    return sorted(rows, key=lambda r: (r["task"], r["shot"], -r["mean"] if not math.isnan(r["mean"]) else 0))


def cka_section(cka_dir: Path | None, output: Path) -> tuple[list[dict], str, list[tuple[str, str]]]:
    """(rows of ``cka.csv``, the Markdown section, figures written to ``output``)."""
    title = "## Feature reuse (CKA)\n"
    comparisons = read_comparisons(Path(cka_dir)) if cka_dir is not None and Path(cka_dir).is_dir() else []
    if not comparisons:
        where = f"in {cka_dir}" if cka_dir is not None else "(no --cka folder given)"
        return [], "\n".join([title, f"No few- vs many-shot CKA results {where}. Make them with: nnssl_cka "
                                     f"MODEL_FOLDER:FEWSHOT_FOLD MODEL_FOLDER:BASE_FOLD -o DIR, then nnssl_report "
                                     f"--cka DIR.\n"]), []
    rows = cka_rows(comparisons)
    layers = [layer for layer in LAYERS if any(not math.isnan(r[layer]) for r in rows)]
    figures = []
    for task in dict.fromkeys(r["task"] for r in rows):
        of_task = [r for r in rows if r["task"] == task and not math.isnan(r["mean"])]
        if not of_task:
            continue
        best, worst = max(of_task, key=lambda r: r["mean"]), min(of_task, key=lambda r: r["mean"])
        panels = []
        for chosen in [best] if best is worst else [best, worst]:
            entry = next(c for c in comparisons if (c["task"], c["method"], c["shot"]) ==
                         (chosen["task"], chosen["method"], chosen["shot"]))
            few, many = chosen["shot"].split(" vs ")
            panels.append({**entry["comparison"], "a": f"{chosen['method']} {few}", "b": f"{chosen['method']} {many}"})
        name = f"cka_{''.join(c if c.isalnum() else '_' for c in task)}.png"
        plots.cka_heatmaps(panels, output / name)
        figures.append((f"CKA heatmaps, highest and lowest mean reuse: {task}", name))
    text = [title, "Same-layer linear CKA between the model fine-tuned on a few-shot fold and the one fine-tuned on "
                   "its many-shot base fold (`nnssl_cka`), averaged over the comparisons found (base folds, seeds); "
                   "encoder stages first, then decoder blocks. Higher = the few-shot model reuses more of the "
                   "many-shot model's features. Full table: `cka.csv`; heatmaps of the methods with the highest and "
                   "lowest mean below.\n",
            markdown_table(rows, ["task", "method", "shot", "comparisons", *layers, "encoder_mean", "decoder_mean"],
                           digits=2)]
    return rows, "\n".join(text), figures
