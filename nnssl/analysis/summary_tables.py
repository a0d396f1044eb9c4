"""The report's tables from the fold runs: Dice and ranks, few-shot gap, convergence, CT vs MRI, method families.

Each table is a list of row dicts (one CSV file each), sorted by task, shot setting and method family.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import numpy as np

from nnssl.analysis.fold_runs import FoldRun
from nnssl.analysis.references import BASELINE, is_ranked
from nnssl.analysis.results import MANY_SHOT, SCRATCH, UNKNOWN
from nnssl.methods.base import FAMILIES

FAMILY_ORDER = (SCRATCH, *FAMILIES, UNKNOWN, BASELINE)
THRESHOLDS = (0.9, 0.95)  # fractions of the final pseudo-Dice for "epochs to reach"


def convergence(curve: Sequence[float]) -> dict[str, float]:
    """Epochs until ``curve`` (pseudo-Dice per epoch) first reaches 90% / 95% of its last value, and its
    normalised area (mean over epochs). Epochs count from 1; NaN where undefined (empty curve, final <= 0)."""
    values = np.asarray(curve, dtype=float)
    result = {"final_pseudo_dice": float(values[-1]) if len(values) else math.nan,
              "auc": float(values.mean()) if len(values) else math.nan}
    for fraction in THRESHOLDS:
        key = f"epochs_to_{round(fraction * 100)}"
        final = result["final_pseudo_dice"]
        reached = np.flatnonzero(values >= fraction * final) if len(values) and final > 0 else []
        result[key] = float(reached[0] + 1) if len(reached) else math.nan
    return result


def _sample_std(values: Sequence[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else math.nan


def group_runs(runs: Iterable[FoldRun], *keys: str) -> dict[tuple, list[FoldRun]]:
    groups: dict[tuple, list[FoldRun]] = {}
    for run in runs:
        groups.setdefault(tuple(getattr(run, k) for k in keys), []).append(run)
    return groups


def dice_table(runs: list[FoldRun], rank_baselines: bool = False) -> list[dict[str, Any]]:
    """Per task x method x shot: Dice mean/std over all cases of all folds and seeds, std of fold means (a fold's
    mean over its seeds), rank (NaN for baseline rows unless ``rank_baselines``)."""
    rows = []
    for (task, method, shot), group in group_runs((r for r in runs if r.case_dice), "task", "method", "shot").items():
        cases = [d for r in group for d in r.case_dice]
        fold_means = [np.mean([np.mean(r.case_dice) for r in fold]) for fold in group_runs(group, "fold").values()]
        rows.append({"task": task, "modality": group[0].modality, "method": method, "family": group[0].family,
                     "shot": shot, "folds": len(fold_means), "seeds": len({r.seed_repeat for r in group}),
                     "cases": len(cases), "dice_mean": float(np.mean(cases)), "dice_std": _sample_std(cases),
                     "dice_fold_std": _sample_std(fold_means)})
    for group in group_rows(rows, "task", "shot").values():
        ranked = [r for r in group if is_ranked(r, rank_baselines)]
        for row, rank in zip(ranked, descending_ranks([r["dice_mean"] for r in ranked])):
            row["rank"] = rank
        for row in group:
            row.setdefault("rank", math.nan)
    return sorted_rows(rows)


def seed_noise_table(runs: list[FoldRun], dice_rows: list[dict]) -> list[dict[str, Any]]:
    """Per task x method with many-shot folds fine-tuned with several seeds: the mean Dice of each seed over the
    folds every seed has (a seed's fold means averaged), their standard deviation over seeds (``seed_std``: seed
    noise), beside ``methods_std``, the standard deviation over the task's ranked methods of their many-shot mean
    Dice (the differences the study measures), and their ratio."""
    spread = {task: _sample_std([r["dice_mean"] for r in group if not math.isnan(r["rank"])])
              for (task, shot), group in group_rows(dice_rows, "task", "shot").items() if shot == MANY_SHOT}
    rows = []
    many_shot = (r for r in runs if r.case_dice and r.shot == MANY_SHOT)
    for (task, method), group in group_runs(many_shot, "task", "method").items():
        by_seed = {repeat: {r.fold: float(np.mean(r.case_dice)) for r in seed_runs}
                   for (repeat,), seed_runs in group_runs(group, "seed_repeat").items()}
        folds = sorted(set.intersection(*(set(f) for f in by_seed.values())))
        if len(by_seed) < 2 or not folds:
            continue
        seed_means = [float(np.mean([fold_dice[f] for f in folds])) for fold_dice in by_seed.values()]
        seed_std = _sample_std(seed_means)
        rows.append({"task": task, "modality": group[0].modality, "method": method, "family": group[0].family,
                     "shot": MANY_SHOT, "seeds": len(seed_means), "folds": len(folds),
                     "seed_dice": " ".join(f"{m:.3f}" for m in seed_means), "seed_std": seed_std,
                     "methods_std": spread.get(task, math.nan),
                     "seed_to_methods": seed_std / spread[task] if spread.get(task) else math.nan})
    return sorted_rows(rows)


def descending_ranks(values: Sequence[float]) -> list[float]:
    """Rank 1 for the largest value; tied values share the mean of the ranks they span."""
    ordered = sorted(values, reverse=True)
    return [ordered.index(v) + (ordered.count(v) + 1) / 2 for v in values]


def group_rows(rows: list[dict], *keys: str) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    return groups


def average_ranks(dice_rows: list[dict]) -> list[dict[str, Any]]:
    """Per method x shot (and over all shot settings, ``shot="all"``): mean rank over tasks."""
    rows = []
    for (method, shot), group in group_rows(dice_rows, "method", "shot").items():
        rows.append({"method": method, "family": group[0]["family"], "shot": shot, "tasks": len(group),
                     "average_rank": float(np.mean([r["rank"] for r in group]))})
    for (method,), group in group_rows(dice_rows, "method").items():
        rows.append({"method": method, "family": group[0]["family"], "shot": "all", "tasks": len(group),
                     "average_rank": float(np.mean([r["rank"] for r in group]))})
    return sorted_rows(rows)


def gap_table(dice_rows: list[dict]) -> list[dict[str, Any]]:
    """Per task x method x few-shot setting: many-shot minus k-shot mean Dice (absolute and relative)."""
    many = {(r["task"], r["method"]): r["dice_mean"] for r in dice_rows if r["shot"] == MANY_SHOT}
    rows = []
    for r in dice_rows:
        if r["shot"] in (MANY_SHOT, UNKNOWN) or (r["task"], r["method"]) not in many:
            continue
        reference = many[(r["task"], r["method"])]
        rows.append({"task": r["task"], "modality": r["modality"], "method": r["method"], "family": r["family"],
                     "shot": r["shot"], "many_shot_dice": reference, "few_shot_dice": r["dice_mean"],
                     "gap": reference - r["dice_mean"],
                     "relative_gap": (reference - r["dice_mean"]) / reference if reference > 0 else math.nan})
    return sorted_rows(rows)


def convergence_table(runs: list[FoldRun]) -> list[dict[str, Any]]:
    """Per task x method x shot: convergence measures (:func:`convergence`) averaged over its runs (every fold of
    every seed repeat); ``folds`` and ``seeds`` count them as the Dice table does."""
    rows = []
    with_log = (r for r in runs if r.logging.get("ema_fg_dice"))
    for (task, method, shot), group in group_runs(with_log, "task", "method", "shot").items():
        measures = [convergence(r.logging["ema_fg_dice"]) for r in group]
        row = {"task": task, "modality": group[0].modality, "method": method, "family": group[0].family,
               "shot": shot, "folds": len({r.fold for r in group}), "seeds": len({r.seed_repeat for r in group}),
               "epochs": float(np.mean([len(r.logging["ema_fg_dice"]) for r in group]))}
        for key in measures[0]:
            row[key] = float(np.nanmean([m[key] for m in measures])) if any(
                not math.isnan(m[key]) for m in measures) else math.nan
        for key in ("train_losses", "val_losses"):
            finals = [r.logging[key][-1] for r in group if r.logging.get(key)]
            row[f"final_{key[:-2]}"] = float(np.mean(finals)) if finals else math.nan
        rows.append(row)
    return sorted_rows(rows)


def modality_table(dice_rows: list[dict]) -> list[dict[str, Any]]:
    """Per method x shot: mean Dice over CT tasks and over MRI tasks, their difference and average ranks."""
    rows = []
    for (method, shot), group in group_rows(dice_rows, "method", "shot").items():
        row: dict[str, Any] = {"method": method, "family": group[0]["family"], "shot": shot}
        for modality in ("CT", "MRI"):
            of = [r for r in group if r["modality"] == modality]
            row[f"{modality}_tasks"] = len(of)
            row[f"{modality}_dice"] = float(np.mean([r["dice_mean"] for r in of])) if of else math.nan
            row[f"{modality}_rank"] = float(np.mean([r["rank"] for r in of])) if of else math.nan
        row["MRI_minus_CT"] = row["MRI_dice"] - row["CT_dice"]
        rows.append(row)
    return sorted_rows(rows)


def family_table(dice_rows: list[dict]) -> list[dict[str, Any]]:
    """Per family x shot (x modality, and "all"): mean over tasks and member methods of mean Dice and rank."""
    rows = []
    for modality in ("all", "CT", "MRI"):
        chosen = [r for r in dice_rows if modality == "all" or r["modality"] == modality]
        for (family, shot), group in group_rows(chosen, "family", "shot").items():
            rows.append({"family": family, "shot": shot, "modality": modality,
                         "methods": " ".join(sorted({r["method"] for r in group})),
                         "tasks": len({r["task"] for r in group}),
                         "dice_mean": float(np.mean([r["dice_mean"] for r in group])),
                         "average_rank": float(np.mean([r["rank"] for r in group]))})
    return sorted(rows, key=lambda r: (("all", "CT", "MRI").index(r["modality"]), shot_key(r["shot"]),
                                       family_key(r["family"])))


def shot_key(shot: str) -> tuple:
    if shot.endswith("-shot") and shot[:-5].isdigit():
        return 0, int(shot[:-5])
    return {MANY_SHOT: (1, 0), "all": (2, 0)}.get(shot, (3, 0))


def family_key(family: str) -> int:
    return FAMILY_ORDER.index(family) if family in FAMILY_ORDER else len(FAMILY_ORDER)


def method_key(row: dict) -> tuple:
    return family_key(row.get("family", UNKNOWN)), row["method"]


def sorted_rows(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: (r.get("task", ""), shot_key(r["shot"]), *method_key(r)))
