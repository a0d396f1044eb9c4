"""``nnssl_report``'s provenance section: which software and hardware made each method's results.

Fine-tuning provenance comes from the ``nnssl`` section of each model folder's ``plans.json`` (one record
per fold, written by the trainers); pretraining provenance from the ``config.json`` of the run folder the
fine-tuning's encoder came from. Runs compared in one report that used different versions of nnssl (or its
commit), torch, MONAI, nnU-Net or Python get a warning: their differences may come from the software.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from nnssl.plans_variants import PLANS_KEY
from nnssl.io import load_json
from nnssl.provenance import VERSION_KEYS, version_differences

SHOWN = (*VERSION_KEYS, "device", "world_size")
FINETUNING, PRETRAINING = "fine-tuning", "pretraining"


def provenance_table(runs: Sequence[Any], results_root: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows (method x stage: the distinct values of each provenance field, with the number of runs) and
    warnings. ``runs``: the report's fold runs (``dataset``, ``trainer``, ``plans``, ``configuration``,
    ``method``, ``fold``, ``task``)."""
    records: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}  # (method, stage) -> run name -> record
    for run in runs:
        settings = _settings(results_root / run.dataset / f"{run.trainer}__{run.plans}__{run.configuration}",
                             run.configuration)
        name = f"{run.method} {run.task} fold {run.fold}"
        record = (settings.get("provenance") or {}).get(str(run.fold))
        if record:
            records.setdefault((run.method, FINETUNING), {})[name] = record
        encoder = (settings.get("pretrained") or {}).get("path")
        pretraining = _pretraining_record(Path(encoder)) if encoder else None
        if pretraining:
            records.setdefault((run.method, PRETRAINING), {})[encoder] = pretraining
    rows = [{"method": method, "stage": stage, "runs": len(named),
             **{key: ", ".join(sorted({str(r.get(key)) for r in named.values()})) for key in SHOWN}}
            for (method, stage), named in sorted(records.items())]
    warnings = []
    for stage in (FINETUNING, PRETRAINING):
        pooled = {name: record for (_, s), named in records.items() if s == stage for name, record in named.items()}
        for key, by_value in version_differences(pooled).items():
            listed = "; ".join(f"{value}: {len(names)} run(s), e.g. {names[0]}" for value, names in by_value.items())
            warnings.append(f"WARNING: the {stage} runs compared in this report used different {key} versions "
                            f"({listed}); differences between methods may come from the software.")
    return rows, warnings


def _settings(model_folder: Path, configuration: str) -> dict[str, Any]:
    plans = model_folder / "plans.json"
    if not plans.is_file():
        return {}
    return load_json(plans).get("configurations", {}).get(configuration, {}).get(PLANS_KEY) or {}


def _pretraining_record(encoder: Path) -> dict[str, Any] | None:
    config = encoder.parent / "config.json"
    return load_json(config).get("provenance") if config.is_file() else None
