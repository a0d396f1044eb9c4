"""``nnssl_report``: the study's tables and figures from what nnU-Net wrote to ``$nnUNet_results``.

For every nnssl SwinUNETR trainer x fold of the chosen datasets (many-shot folds 0-4, few-shot folds from
the dataset's ``fewshot.json``):

- Dice: per validation case, the mean over foreground labels of nnU-Net's ``validation/summary.json``
  (labels with an empty reference and prediction, Dice NaN, are skipped); per task x method x shot
  setting the mean and standard deviation over all cases of all folds, the standard deviation of the
  fold means, the method's rank within the task and shot setting (1 = best, ties share the mean rank),
  and each method's average rank over tasks.
- Few-shot gap: many-shot mean Dice minus k-shot mean Dice, per task and method.
- Convergence, from the fold checkpoint's training log (nnU-Net's ``logging``: EMA pseudo-Dice and
  losses per epoch): epochs until the EMA pseudo-Dice first reaches 90% and 95% of its final value, and
  its area under the curve normalised by the number of epochs (its mean; 1 = perfect from epoch 1).
- CT versus MRI tasks (``imaging_modality`` of dataset.json, else CT if a channel is named CT) and the
  pretext families (``nnssl.methods.registry``) aggregated as means of the methods' mean Dice.

Runs that are missing (a method x fold another method of the task has), unfinished (no
``checkpoint_final.pth``) or not validated (no ``validation/summary.json``) are listed, not dropped.
Writes ``report.md``, CSV tables and PNG figures to the output folder.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from nnssl.analysis import plots
from nnssl.analysis.provenance_table import SHOWN, provenance_table
from nnssl.analysis.probe_table import MIN_METHODS, probe_tables, read_probes
from nnssl.analysis.protocol import alignment_rows, budget_rows, protocol_sections
from nnssl.analysis.references import BASELINE, is_ranked, report_baselines
from nnssl.analysis.results import (MANY_SHOT, SCRATCH, UNKNOWN, ModelFolder, case_id, dataset_modality,
                                    load_fewshot, method_family, nnssl_trainer_classes, parse_model_folder,
                                    shot_setting, trainer_method)
from nnssl.analysis.review import Review, review
from nnssl.analysis.tables import markdown_table, write_csv
from nnssl.errors import NnsslError
from nnssl.io import load_json, save_text
from nnssl.methods.base import FAMILIES
from nnssl.paths import dataset_folder, nnunet_preprocessed, nnunet_results

log = logging.getLogger(__name__)

FINISHED, UNFINISHED, NOT_VALIDATED, MISSING = "finished", "unfinished", "not validated", "missing"
FAMILY_ORDER = (SCRATCH, *FAMILIES, UNKNOWN, BASELINE)
THRESHOLDS = (0.9, 0.95)  # fractions of the final pseudo-Dice for "epochs to reach"


@dataclass
class FoldRun:
    """One trainer x fold of one task, as found on disk."""

    task: str
    dataset: str
    modality: str
    trainer: str
    plans: str
    configuration: str
    method: str
    family: str
    fold: str
    shot: str
    status: str
    detail: str = ""
    case_dice: list[float] = field(default_factory=list)
    case_ids: list[str] = field(default_factory=list)  # the cases of case_dice, in the same order
    logging: dict[str, list] = field(default_factory=dict)  # nnU-Net logging lists (ema_fg_dice, val_losses, ...)


# -- reading results ------------------------------------------------------------------------------------
def dice_by_case(summary: dict) -> dict[str, float]:
    """Case identifier -> mean Dice over the foreground labels/regions with a defined Dice, per case of
    nnU-Net's ``summary.json`` (cases where no label has one are left out)."""
    values = {}
    for case in summary["metric_per_case"]:
        dice = [m["Dice"] for m in case["metrics"].values() if m.get("Dice") is not None and not math.isnan(m["Dice"])]
        if dice:
            values[case_id(case["reference_file"])] = float(np.mean(dice))
    return values


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


def _read_fold(folder: ModelFolder, fold: str, base: dict[str, str]) -> FoldRun:
    fold_dir = folder.path / f"fold_{fold}"
    run = FoldRun(fold=fold, status=FINISHED, **base)
    final = fold_dir / "checkpoint_final.pth"
    retrain = f"nnUNetv2_train {folder.dataset} {folder.configuration} {fold} -tr {folder.trainer} -p {folder.plans}"
    if not final.is_file():
        latest = fold_dir / "checkpoint_latest.pth"
        progress = f" (checkpoint_latest.pth after epoch {_load(latest)['current_epoch']})" if latest.is_file() else ""
        run.status, run.detail = UNFINISHED, f"no checkpoint_final.pth{progress}; continue with: {retrain} --c"
        return run
    summary = fold_dir / "validation" / "summary.json"
    if not summary.is_file():
        run.status, run.detail = NOT_VALIDATED, f"no validation/summary.json; validate with: {retrain} --val"
        return run
    by_case = dice_by_case(load_json(summary))
    run.case_ids, run.case_dice = list(by_case), list(by_case.values())
    run.logging = _load(final).get("logging") or {}
    return run


def _load(checkpoint: Path) -> dict:
    # mmap: only the small logging lists are read, not the network weights
    return torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=True)


def collect_runs(datasets: Sequence[str] | None = None,
                 baselines: Mapping[str, str] | None = None) -> tuple[list[FoldRun], list[str]]:
    """Every nnssl SwinUNETR trainer x fold under ``$nnUNet_results`` (only ``datasets`` if given), and
    notes on what was skipped. ``baselines``: model folder name (``nnUNetTrainer__nnUNetPlans__3d_fullres``)
    -> row name of the reference trainers to read too (family ``baseline``)."""
    root = nnunet_results()
    if not root.is_dir():
        raise NnsslError(f"$nnUNet_results ({root}) does not exist; train models with nnUNetv2_train first.")
    dataset_dirs = ([dataset_folder(root, d, "nnUNet_results") for d in datasets] if datasets
                    else sorted(p for p in root.glob("Dataset*") if p.is_dir()))
    ours = nnssl_trainer_classes()
    baselines = baselines or {}
    runs, notes = [], []
    for dataset_dir in dataset_dirs:
        folders = [parse_model_folder(p) for p in sorted(dataset_dir.iterdir())
                   if p.is_dir() and p.name.count("__") == 2]
        references = [f for f in folders if f.path.name in baselines]
        folders = [f for f in folders if f not in references and (f.trainer in ours or f.nnssl_settings() is not None)]
        if not folders:
            notes.append(f"{dataset_dir.name}: no nnssl SwinUNETR model folders")
            continue
        several = len({(f.plans, f.configuration) for f in folders}) > 1
        fewshot = _fewshot_of(dataset_dir.name, notes)
        for folder in folders + references:
            if not (folder.path / "dataset.json").is_file():
                notes.append(f"{folder.path}: no dataset.json (not written by nnUNetv2_train?); skipped")
                continue
            if folder in references:
                method, family = baselines[folder.path.name], BASELINE
            else:
                method = (trainer_method(ours[folder.trainer]) if folder.trainer in ours
                          else (folder.nnssl_settings().get("pretrained") or {}).get("method", SCRATCH))
                family = method_family(method)
            base = {"task": f"{folder.dataset} [{folder.plans}/{folder.configuration}]" if several else folder.dataset,
                    "dataset": folder.dataset, "modality": dataset_modality(load_json(folder.path / "dataset.json")),
                    "trainer": folder.trainer, "plans": folder.plans, "configuration": folder.configuration,
                    "method": method, "family": family}
            for fold in folder.folds:
                runs.append(_read_fold(folder, fold, {**base, "shot": shot_setting(fold, fewshot)}))
    if not runs:
        raise NnsslError(f"No nnssl SwinUNETR trainings found in $nnUNet_results ({root})"
                         f"{' for ' + ', '.join(map(str, datasets)) if datasets else ''}. Train one with: "
                         f"nnUNetv2_train DATASET 3d_fullres FOLD -tr SwinUNETR_Scratch_Trainer")
    return runs, notes


def _fewshot_of(dataset: str, notes: list[str]) -> dict[str, dict]:
    try:
        preprocessed = nnunet_preprocessed() / dataset
    except NnsslError:
        notes.append(f"{dataset}: $nnUNet_preprocessed is not set, so fewshot.json cannot be read; folds above 4 "
                     f"are reported with shot setting '{UNKNOWN}'")
        return {}
    return load_fewshot(preprocessed)


def missing_runs(runs: list[FoldRun]) -> list[FoldRun]:
    """Placeholders for every (task, method, fold) that another method of the task has but this one lacks;
    methods are those found in any task."""
    methods = {r.method: r for r in runs}
    missing = []
    for task in dict.fromkeys(r.task for r in runs):
        in_task = [r for r in runs if r.task == task]
        folds = {r.fold: r.shot for r in in_task}
        present = {(r.method, r.fold) for r in in_task}
        for method, fold in ((m, f) for m in methods for f in folds):
            if (method, fold) not in present:
                example = in_task[0]
                # a baseline keeps its own plans and configuration; SSL methods share the task's
                origin = methods[method] if methods[method].family == BASELINE else example
                trainer = methods[method].trainer
                missing.append(FoldRun(task=task, dataset=example.dataset, modality=example.modality, trainer=trainer,
                                       plans=origin.plans, configuration=origin.configuration, method=method,
                                       family=methods[method].family, fold=fold, shot=folds[fold], status=MISSING,
                                       detail=f"train with: nnUNetv2_train {example.dataset} {origin.configuration} "
                                              f"{fold} -tr {trainer} -p {origin.plans}"))
    return missing


# -- tables -----------------------------------------------------------------------------------------------
def _sample_std(values: Sequence[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else math.nan


def _groups(runs: Iterable[FoldRun], *keys: str) -> dict[tuple, list[FoldRun]]:
    groups: dict[tuple, list[FoldRun]] = {}
    for run in runs:
        groups.setdefault(tuple(getattr(run, k) for k in keys), []).append(run)
    return groups


def dice_table(runs: list[FoldRun], rank_baselines: bool = False) -> list[dict[str, Any]]:
    """Per task x method x shot: Dice mean/std over all cases of all folds, std of fold means, rank (NaN for
    baseline rows unless ``rank_baselines``)."""
    rows = []
    for (task, method, shot), group in _groups((r for r in runs if r.case_dice), "task", "method", "shot").items():
        cases = [d for r in group for d in r.case_dice]
        rows.append({"task": task, "modality": group[0].modality, "method": method, "family": group[0].family,
                     "shot": shot, "folds": len(group), "cases": len(cases), "dice_mean": float(np.mean(cases)),
                     "dice_std": _sample_std(cases),
                     "dice_fold_std": _sample_std([float(np.mean(r.case_dice)) for r in group])})
    for group in _groups_of_rows(rows, "task", "shot").values():
        ranked = [r for r in group if is_ranked(r, rank_baselines)]
        for row, rank in zip(ranked, descending_ranks([r["dice_mean"] for r in ranked])):
            row["rank"] = rank
        for row in group:
            row.setdefault("rank", math.nan)
    return _sorted(rows)


def descending_ranks(values: Sequence[float]) -> list[float]:
    """Rank 1 for the largest value; tied values share the mean of the ranks they span."""
    ordered = sorted(values, reverse=True)
    return [ordered.index(v) + (ordered.count(v) + 1) / 2 for v in values]


def _groups_of_rows(rows: list[dict], *keys: str) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    return groups


def average_ranks(dice_rows: list[dict]) -> list[dict[str, Any]]:
    """Per method x shot (and over all shot settings, ``shot="all"``): mean rank over tasks."""
    rows = []
    for (method, shot), group in _groups_of_rows(dice_rows, "method", "shot").items():
        rows.append({"method": method, "family": group[0]["family"], "shot": shot, "tasks": len(group),
                     "average_rank": float(np.mean([r["rank"] for r in group]))})
    for (method,), group in _groups_of_rows(dice_rows, "method").items():
        rows.append({"method": method, "family": group[0]["family"], "shot": "all", "tasks": len(group),
                     "average_rank": float(np.mean([r["rank"] for r in group]))})
    return _sorted(rows)


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
    return _sorted(rows)


def convergence_table(runs: list[FoldRun]) -> list[dict[str, Any]]:
    """Per task x method x shot: convergence measures (:func:`convergence`) averaged over folds."""
    rows = []
    with_log = (r for r in runs if r.logging.get("ema_fg_dice"))
    for (task, method, shot), group in _groups(with_log, "task", "method", "shot").items():
        measures = [convergence(r.logging["ema_fg_dice"]) for r in group]
        row = {"task": task, "modality": group[0].modality, "method": method, "family": group[0].family,
               "shot": shot, "folds": len(group),
               "epochs": float(np.mean([len(r.logging["ema_fg_dice"]) for r in group]))}
        for key in measures[0]:
            row[key] = float(np.nanmean([m[key] for m in measures])) if any(
                not math.isnan(m[key]) for m in measures) else math.nan
        for key in ("train_losses", "val_losses"):
            finals = [r.logging[key][-1] for r in group if r.logging.get(key)]
            row[f"final_{key[:-2]}"] = float(np.mean(finals)) if finals else math.nan
        rows.append(row)
    return _sorted(rows)


def modality_table(dice_rows: list[dict]) -> list[dict[str, Any]]:
    """Per method x shot: mean Dice over CT tasks and over MRI tasks, their difference and average ranks."""
    rows = []
    for (method, shot), group in _groups_of_rows(dice_rows, "method", "shot").items():
        row: dict[str, Any] = {"method": method, "family": group[0]["family"], "shot": shot}
        for modality in ("CT", "MRI"):
            of = [r for r in group if r["modality"] == modality]
            row[f"{modality}_tasks"] = len(of)
            row[f"{modality}_dice"] = float(np.mean([r["dice_mean"] for r in of])) if of else math.nan
            row[f"{modality}_rank"] = float(np.mean([r["rank"] for r in of])) if of else math.nan
        row["MRI_minus_CT"] = row["MRI_dice"] - row["CT_dice"]
        rows.append(row)
    return _sorted(rows)


def family_table(dice_rows: list[dict]) -> list[dict[str, Any]]:
    """Per family x shot (x modality, and "all"): mean over tasks and member methods of mean Dice and rank."""
    rows = []
    for modality in ("all", "CT", "MRI"):
        chosen = [r for r in dice_rows if modality == "all" or r["modality"] == modality]
        for (family, shot), group in _groups_of_rows(chosen, "family", "shot").items():
            rows.append({"family": family, "shot": shot, "modality": modality,
                         "methods": " ".join(sorted({r["method"] for r in group})),
                         "tasks": len({r["task"] for r in group}),
                         "dice_mean": float(np.mean([r["dice_mean"] for r in group])),
                         "average_rank": float(np.mean([r["rank"] for r in group]))})
    return sorted(rows, key=lambda r: (("all", "CT", "MRI").index(r["modality"]), _shot_key(r["shot"]),
                                       _family_key(r["family"])))


def _shot_key(shot: str) -> tuple:
    if shot.endswith("-shot") and shot[:-5].isdigit():
        return 0, int(shot[:-5])
    return {MANY_SHOT: (1, 0), "all": (2, 0)}.get(shot, (3, 0))


def _family_key(family: str) -> int:
    return FAMILY_ORDER.index(family) if family in FAMILY_ORDER else len(FAMILY_ORDER)


def _method_key(row: dict) -> tuple:
    return _family_key(row.get("family", UNKNOWN)), row["method"]


def _sorted(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: (r.get("task", ""), _shot_key(r["shot"]), *_method_key(r)))


# -- the report -------------------------------------------------------------------------------------------
def make_report(datasets: Sequence[str] | None = None, output: str | Path = "nnssl_report",
                plan: str | Path | None = None, baselines: Sequence[str] | None = None, rank_baselines: bool = False,
                cka_dir: str | Path | None = None, probe: str | Path | None = None) -> dict[str, Any]:
    """Collect every nnssl SwinUNETR fold under ``$nnUNet_results`` and write the report to ``output``;
    ``probe``: a folder with ``nnssl_probe`` results (probe.json files) for the probe Dice column.

    ``plan``: the benchmark plan (default ``plans/benchmark.json``) naming the baselines (reference rows,
    ranked only with ``rank_baselines``; ``baselines`` names others) and the NSD tolerances; ``cka_dir``: where
    ``nnssl_cka`` wrote few- vs many-shot results. Returns the tables (lists of row dicts) by name, as written
    to ``<name>.csv``.
    """
    runs, notes = collect_runs(datasets, report_baselines(plan, baselines))
    runs = runs + missing_runs(runs)
    dice_rows = dice_table(runs, rank_baselines)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    extras = review(runs, dice_rows, output, plan, Path(cka_dir) if cka_dir else None)
    tables = {
        "folds": [_fold_row(r) for r in sorted(runs, key=lambda r: (r.task, *_method_key(vars(r)), _fold_key(r.fold)))],
        "dice": dice_rows,
        "ranks": average_ranks(dice_rows),
        "gap": gap_table(dice_rows),
        "convergence": convergence_table(runs),
        "modality": modality_table(dice_rows),
        "families": family_table(dice_rows),
        "alignment": alignment_rows(runs),
        "budget": budget_rows(runs),
    }
    tables["probe"], tables["probe_correlation"] = probe_tables(dice_rows, read_probes(probe))
    tables["problems"] = [row for row in tables["folds"] if row["status"] != FINISHED]
    tables["provenance"], warnings = provenance_table([r for r in runs if r.status != MISSING], nnunet_results())
    for warning in warnings:
        log.warning("%s", warning)
    notes = warnings + notes
    tables.update(extras.tables)
    for name, rows in tables.items():
        write_csv(rows, output / f"{name}.csv", columns=None if rows else ["task", "method", "fold", "status"])
    figures = _figures(runs, tables, output) + extras.figures
    save_text(_markdown(runs, tables, notes, figures, extras), output / "report.md")
    log.info("nnssl_report: wrote report.md, %d tables and %d figures to %s", len(tables), len(figures), output)
    return tables


def _fold_key(fold: str) -> tuple:
    return (0, int(fold)) if fold.isdigit() else (1, 0)


def _fold_row(run: FoldRun) -> dict[str, Any]:
    row = {"task": run.task, "dataset": run.dataset, "modality": run.modality, "trainer": run.trainer,
           "method": run.method, "family": run.family, "fold": run.fold, "shot": run.shot, "status": run.status,
           "cases": len(run.case_dice), "dice_mean": float(np.mean(run.case_dice)) if run.case_dice else math.nan,
           "epochs": len(run.logging.get("ema_fg_dice", [])) or None}
    if run.logging.get("ema_fg_dice"):
        row.update(convergence(run.logging["ema_fg_dice"]))
    row["detail"] = run.detail
    return row


def _figures(runs: list[FoldRun], tables: dict[str, list[dict]], output: Path) -> list[tuple[str, str]]:
    """Write the PNGs; returns (title, file name) pairs for report.md."""
    methods = [r.method for r in sorted({r.method: r for r in runs}.values(), key=lambda r: _method_key(vars(r)))]
    shots = sorted({r.shot for r in runs}, key=_shot_key)
    figures = []
    if tables["dice"]:
        plots.dice_bars(tables["dice"], methods, shots, output / "dice.png")
        figures.append(("Dice per task, method and shot setting", "dice.png"))
    for task in dict.fromkeys(r.task for r in runs if r.logging.get("ema_fg_dice")):
        name = f"convergence_{_file_safe(task)}.png"
        curves = _mean_curves([r for r in runs if r.task == task and r.logging.get("ema_fg_dice")])
        plots.convergence_curves(task, curves, methods, output / name)
        figures.append((f"Convergence: {task}", name))
    if tables["gap"]:
        plots.gap_bars(tables["gap"], methods, shots, output / "gap.png")
        figures.append(("Few-shot to many-shot gap", "gap.png"))
    if tables["modality"]:
        plots.modality_bars(tables["modality"], methods, shots, output / "modality.png")
        figures.append(("CT vs MRI tasks", "modality.png"))
    return figures


def _mean_curves(runs: list[FoldRun]) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """shot -> method -> {"ema_fg_dice", "val_losses"}: per-epoch mean over the folds that reached the epoch."""
    curves: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for (shot, method), group in sorted(_groups(runs, "shot", "method").items(),
                                        key=lambda item: (_shot_key(item[0][0]), _method_key(vars(item[1][0])))):
        curves.setdefault(shot, {})[method] = {key: _ragged_mean([r.logging.get(key, []) for r in group])
                                               for key in ("ema_fg_dice", "val_losses")}
    return curves


def _ragged_mean(series: list[list[float]]) -> np.ndarray:
    length = max(len(s) for s in series)
    padded = np.full((len(series), length), np.nan)
    for i, s in enumerate(series):
        padded[i, :len(s)] = s
    return np.nanmean(padded, axis=0)  # every epoch up to the longest series has at least one value


def _file_safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)


def _pm(row: dict, mean: str, std: str) -> str:
    if isinstance(row.get(std), float) and not math.isnan(row[std]):
        return f"{row[mean]:.3f} ± {row[std]:.3f}"
    return f"{row[mean]:.3f}"


def _markdown(runs: list[FoldRun], tables: dict[str, list[dict]], notes: list[str],
              figures: list[tuple[str, str]], extras: Review) -> str:
    finished = sum(r.status == FINISHED for r in runs)
    tasks = sorted({r.task for r in runs})
    parts = [
        "# nnssl report\n",
        f"{finished} finished fold(s) of {len(runs)} expected, {len(tasks)} task(s), "
        f"{len({r.method for r in runs})} method(s), read from `{nnunet_results()}`.\n",
        "## Dice\n",
        "Mean ± standard deviation over all validation cases of all folds (per case: mean Dice over the "
        "foreground labels of nnU-Net's `summary.json`); rank within the task and shot setting in brackets "
        "(baseline rows, family `baseline`, are references: not ranked unless asked with --rank-baselines); "
        "↑s / ↓s, ↑b / ↓b: significantly better / worse than scratch / the baseline (Paired statistics). "
        "Full table: `dice.csv` (also the standard deviation of the fold means).\n",
    ]
    ranks = {(r["method"], r["shot"]): r["average_rank"] for r in tables["ranks"]}
    for (shot,), rows in sorted(_groups_of_rows(tables["dice"], "shot").items(), key=lambda i: _shot_key(i[0][0])):
        by_method: dict[str, dict[str, Any]] = {}
        for row in rows:
            entry = by_method.setdefault(row["method"], {"method": row["method"], "family": row["family"]})
            rank = "reference" if math.isnan(row["rank"]) else f"{row['rank']:g}"
            marks = extras.marks.get((row["task"], shot, row["method"], "dice"), "")
            entry[row["task"]] = f"{_pm(row, 'dice_mean', 'dice_std')} ({rank}){' ' + marks if marks else ''}"
        for entry in by_method.values():
            entry["average rank"] = ranks[(entry["method"], shot)]
        columns = ["method", "family", *sorted({r["task"] for r in rows}), "average rank"]
        parts += [f"### {shot}\n", markdown_table(sorted(by_method.values(), key=_method_key), columns, digits=2)]
    parts += extras.sections
    sections = [
        ("Average rank", "Mean rank over tasks per shot setting; `all` averages over every task and shot setting.",
         "ranks", ["method", "family", "shot", "tasks", "average_rank"]),
        ("Few-shot to many-shot gap", "Many-shot mean Dice minus few-shot mean Dice (smaller is better).",
         "gap", ["task", "method", "shot", "many_shot_dice", "few_shot_dice", "gap", "relative_gap"]),
        ("Convergence", "From the EMA pseudo-Dice nnU-Net logs per epoch: epochs until it first reaches 90% "
         "and 95% of its final value, and its area under the curve per epoch (mean over epochs); averaged "
         "over folds.", "convergence",
         ["task", "method", "shot", "folds", "epochs", "epochs_to_90", "epochs_to_95", "auc", "final_pseudo_dice",
          "final_val_loss"]),
        ("CT vs MRI tasks", "Mean Dice and average rank over the CT tasks and over the MRI tasks "
         "(transfer from CT pretraining to MRI).", "modality",
         ["method", "family", "shot", "CT_tasks", "CT_dice", "CT_rank", "MRI_tasks", "MRI_dice", "MRI_rank",
          "MRI_minus_CT"]),
        ("Method families", "Means over tasks and member methods of the mean Dice and rank.", "families",
         ["family", "shot", "modality", "methods", "tasks", "dice_mean", "average_rank"]),
        ("Probe Dice", "Linear-probe Dice of each method's encoder (`nnssl_probe`; scratch: the random encoder) "
         "beside its fine-tuning Dice. The probe is a cheap proxy; fine-tuning is the result.", "probe",
         ["task", "shot", "method", "probe_dice", "finetune_dice"]),
        ("Does the probe predict fine-tuning?", "Spearman rank correlation between probe and fine-tuning Dice across "
         f"methods, per task and shot setting (at least {MIN_METHODS} methods).", "probe_correlation",
         ["task", "shot", "methods", "spearman_rho", "p_value"]),
        ("Missing and unfinished runs", "Every task x method x fold that another method of the task has, "
         "without a validated result.", "problems", ["task", "method", "fold", "shot", "status", "detail"]),
        ("Provenance", "Software and hardware of the runs per method: fine-tuning from each model folder's "
         "plans.json, pretraining from the encoder's run folder config.json (distinct values, comma-separated).",
         "provenance", ["method", "stage", "runs", *SHOWN]),
    ]
    for title, text, name, columns in sections:
        rows = tables[name]
        parts += [f"## {title}\n", f"{text} (`{name}.csv`)\n",
                  markdown_table(rows, columns) if rows else "None.\n"]
    parts += protocol_sections(tables)
    if figures:
        parts.append("## Figures\n")
        parts += [f"### {title}\n\n![{title}]({name})\n" for title, name in figures]
    if notes:
        parts += ["## Notes\n", "".join(f"- {note}\n" for note in notes)]
    return "\n".join(parts)
