"""Reference rows of the report: extra nnU-Net trainers (e.g. stock ``nnUNetTrainer``) run on the same folds as
the SSL methods. The question every nnU-Net user asks is whether pretrained SwinUNETR beats what they already
run; these rows answer it without competing in the SSL methods' ranks unless asked (``--rank-baselines``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from nnssl.errors import NnsslError

BASELINE = "baseline"  # the family of reference rows


def is_ranked(row: dict[str, Any], rank_baselines: bool) -> bool:
    """Whether a Dice row takes part in the ranks: every SSL method and scratch, baselines only if asked."""
    return rank_baselines or row["family"] != BASELINE


def report_baselines(plan: str | Path | None, names: Sequence[str] | None) -> dict[str, str]:
    """Model folder name -> row name of the reference trainers the report reads.

    ``names`` (``--baselines``): nnU-Net model folder names (``nnUNetTrainer__nnUNetPlans__3d_fullres``) or trainer
    names (then with the plan's plans identifier and configuration), the trainer its row name; none: the plan's
    ``baselines`` (``plans/benchmark.json`` unless ``plan`` names another).
    """
    from nnssl.benchmark.study import load_study

    study = load_study(plan)
    if names is None:
        return {spec.folder_name: name for name, spec in study.baselines.items()}
    folders = {}
    for name in names:
        parts = name.split("__")
        if len(parts) not in (1, 3) or not all(parts):
            raise NnsslError(f"--baselines {name}: give a trainer (nnUNetTrainer) or an nnU-Net model folder name "
                             f"(nnUNetTrainer__nnUNetPlans__3d_fullres).")
        folder = name if len(parts) == 3 else f"{name}__{study.plans_identifier}__{study.configuration}"
        folders[folder] = parts[0]
    return folders
