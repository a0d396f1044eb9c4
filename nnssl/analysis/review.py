"""What a reviewer of the study asks after the Dice table: surface Dice, paired statistics against scratch and
the nnU-Net baseline, feature reuse (CKA) and pictures. ``nnssl_report`` calls :func:`review` once and merges
its tables, Dice-table marks, Markdown sections and figures into the report.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from tqdm import tqdm

from nnssl.analysis import pictures
from nnssl.analysis.cka_summary import cka_section
from nnssl.analysis.nsd import DEFAULT_TOLERANCE_MM, NsdMissing, class_tolerances, fold_nsd
from nnssl.analysis.references import BASELINE
from nnssl.analysis.results import SCRATCH
from nnssl.analysis.stats import ALPHA, MIN_PAIRS, TOO_FEW, comparison_table, significance_marks
from nnssl.analysis.summary_tables import group_runs
from nnssl.analysis.tables import markdown_table
from nnssl.io import load_json
from nnssl.paths import nnunet_results

log = logging.getLogger(__name__)

@dataclass
class Review:
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    marks: dict[tuple, str] = field(default_factory=dict)  # (task, shot, method, metric) -> "↑s↓b"
    sections: list[str] = field(default_factory=list)  # Markdown, after the Dice tables
    figures: list[tuple[str, str]] = field(default_factory=list)  # (title, file name in the output folder)


def review(runs: Sequence[Any], dice_rows: list[dict[str, Any]], output: Path, plan: str | Path | None = None,
           cka_dir: Path | None = None) -> Review:
    """NSD (added to ``dice_rows`` as ``nsd_mean``/``nsd_std``), statistics, CKA and pictures of ``runs``
    (the report's FoldRuns). ``plan``: the benchmark plan with each task's ``nsd_tolerance_mm``."""
    result = Review()
    tolerance_settings = _tolerance_settings(plan)
    nsd, missing, per_class = collect_nsd(runs, tolerance_settings)
    _add_nsd_columns(dice_rows, runs, nsd)
    dice = _merge_folds(runs, lambda r: dict(zip(r.case_ids, r.case_dice)))
    nsd_values = _merge_folds(runs, lambda r: {c: _mean(v.values()) for c, v in nsd.get(_key(r), {}).items()})
    baselines = list(dict.fromkeys(r.method for r in runs if r.family == BASELINE))
    references = [SCRATCH, *baselines]
    statistics = comparison_table(dice, references, "dice") + comparison_table(nsd_values, references, "nsd")
    result.marks = significance_marks(statistics, {SCRATCH: "s", **{name: "b" for name in baselines}})
    result.tables.update({"statistics": statistics, "nsd_classes": per_class, "nsd_missing": missing})
    result.sections += [_nsd_markdown(dice_rows, missing, tolerance_settings, result.marks),
                        _statistics_markdown(statistics)]
    cka_rows, cka_text, cka_figures = cka_section(cka_dir, output)
    result.tables["cka"] = cka_rows
    result.sections.append(cka_text)
    result.figures += cka_figures
    result.figures += pictures.report_pictures(runs, dice_rows, output)
    return result


# -- NSD --------------------------------------------------------------------------------------------------
def _tolerance_settings(plan: str | Path | None) -> dict[str, Any]:
    """Dataset folder name -> the task's ``nsd_tolerance_mm`` in the benchmark plan."""
    from nnssl.benchmark.study import load_study

    study = load_study(plan)
    return {task.dataset: task.options.get("nsd_tolerance_mm") for task in study.tasks.values()}


def _key(run: Any) -> tuple:
    return run.dataset, run.trainer, run.plans, run.configuration, run.fold


def collect_nsd(runs: Sequence[Any], tolerance_settings: Mapping[str, Any]
                ) -> tuple[dict[tuple, dict[str, dict[int, float]]], list[dict], list[dict]]:
    """NSD of every validated run (run key -> case -> label -> NSD), the runs without NSD and why, and the
    per-class means per task x method x shot."""
    nsd, missing = {}, []
    validated = [r for r in runs if r.case_dice]
    for run in tqdm(validated, desc="NSD", unit="fold", disable=len(validated) < 4):
        folder = nnunet_results() / run.dataset / f"{run.trainer}__{run.plans}__{run.configuration}"
        fold_dir = folder / f"fold_{run.fold}"
        dataset_json = load_json(folder / "dataset.json")
        setting = tolerance_settings.get(run.dataset)
        retry = f"nnUNetv2_train {run.dataset} {run.configuration} {run.fold} -tr {run.trainer} -p {run.plans} --val"
        try:
            nsd[_key(run)] = fold_nsd(fold_dir, run.dataset, dataset_json, load_json(fold_dir / "validation" /
                                      "summary.json"), class_tolerances(dataset_json["labels"], setting), retry)
        except NsdMissing as reason:
            missing.append(_missing_row(run, str(reason)))
        except (RuntimeError, OSError, ValueError) as err:  # unreadable files (SimpleITK raises RuntimeError)
            missing.append(_missing_row(run, f"NSD could not be computed ({type(err).__name__}: {err}); check the "
                                             f"files of {fold_dir / 'validation'}, or re-create them with: {retry}"))
    missing += [_missing_row(r, f"{r.status}: {r.detail}") for r in runs if not r.case_dice and r.status != "missing"]
    per_class = []
    for (task, method, shot), group in group_runs(validated, "task", "method", "shot").items():
        by_label: dict[int, list[float]] = {}
        for run in group:
            for values in nsd.get(_key(run), {}).values():
                for label, value in values.items():
                    by_label.setdefault(label, []).append(value)
        for label, values in sorted(by_label.items()):
            defined = [v for v in values if not math.isnan(v)]
            per_class.append({"task": task, "method": method, "shot": shot, "label": label, "cases": len(defined),
                              "nsd_mean": float(np.mean(defined)) if defined else math.nan})
    return nsd, missing, per_class


def _missing_row(run: Any, reason: str) -> dict[str, Any]:
    return {"task": run.task, "method": run.method, "fold": run.fold, "shot": run.shot, "reason": reason}


def _add_nsd_columns(dice_rows: list[dict], runs: Sequence[Any], nsd: Mapping[tuple, dict]) -> None:
    groups = group_runs(runs, "task", "method", "shot")
    for row in dice_rows:
        cases = [_mean(v.values()) for r in groups.get((row["task"], row["method"], row["shot"]), [])
                 for v in nsd.get(_key(r), {}).values()]
        cases = [c for c in cases if not math.isnan(c)]
        row["nsd_cases"] = len(cases)
        row["nsd_mean"] = float(np.mean(cases)) if cases else math.nan
        row["nsd_std"] = float(np.std(cases, ddof=1)) if len(cases) > 1 else math.nan


def _merge_folds(runs: Sequence[Any], per_case: Callable[[Any], dict[str, float]]
                 ) -> dict[tuple[str, str, str], dict[tuple[str, str], float]]:
    """(task, shot, method) -> {(fold, case): value} over the validated runs; a case of a fold fine-tuned with
    several seeds gets its mean over them. Averaging, rather than pairing (fold, case, seed) where both methods have
    the seed, keeps one pair per validation case: seed repeats of one case are not independent samples (they would
    shrink the p-value without new cases), a method and its reference may have different seeds, and the mean over
    seeds is the method's less noisy Dice on that case."""
    by_seed: dict[tuple[str, str, str], dict[tuple[str, str], list[float]]] = {}
    for run in (r for r in runs if r.case_dice):
        for case, value in per_case(run).items():
            by_seed.setdefault((run.task, run.shot, run.method), {}).setdefault((run.fold, case), []).append(value)
    return {key: {pair: _mean(values) for pair, values in cases.items()} for key, cases in by_seed.items()}


def _mean(values: Any) -> float:
    defined = [v for v in values if not math.isnan(v)]
    return float(np.mean(defined)) if defined else math.nan


def _nsd_markdown(dice_rows: list[dict], missing: list[dict], tolerance_settings: Mapping[str, Any],
                  marks: Mapping[tuple, str]) -> str:
    rows = [r for r in dice_rows if r.get("nsd_cases")]
    parts = ["## Surface Dice (NSD)\n",
             "Normalized surface Dice per validation case (mean over the foreground classes present in prediction "
             "or reference), then mean ± standard deviation over all cases of all folds, beside Dice in "
             "`dice.csv`; per class in `nsd_classes.csv`; marks as for Dice. Tolerances (mm, from the benchmark "
             f"plan's `nsd_tolerance_mm`; {DEFAULT_TOLERANCE_MM:g} mm where a task sets none): "
             + ("; ".join(f"{task}: {_tolerance_text(setting)}" for task, setting in tolerance_settings.items()
                          if any(task in r["task"] for r in dice_rows)) or f"{DEFAULT_TOLERANCE_MM:g}") + ".\n"]
    if rows:
        parts.append(markdown_table([{**r, "NSD": f"{_pm(r)} {marks.get((r['task'], r['shot'], r['method'], 'nsd'), '')}"
                                      .strip()} for r in rows],
                                    ["task", "shot", "method", "family", "nsd_cases", "NSD", "dice_mean"]))
    else:
        parts.append("No NSD values.\n")
    if missing:
        parts += ["\nNSD missing (`nsd_missing.csv`): the Dice tables above still hold these runs where they were "
                  "validated.\n", markdown_table(missing, ["task", "method", "fold", "shot", "reason"])]
    return "\n".join(parts)


def _tolerance_text(setting: Any) -> str:
    if isinstance(setting, Mapping):
        return ", ".join(f"{name} {mm}" for name, mm in setting.items())
    return str(setting if setting is not None else DEFAULT_TOLERANCE_MM)


def _pm(row: dict) -> str:
    std = row.get("nsd_std")
    return f"{row['nsd_mean']:.3f}" + (f" ± {std:.3f}" if isinstance(std, float) and not math.isnan(std) else "")


def _statistics_markdown(statistics: list[dict]) -> str:
    parts = ["## Paired statistics\n",
             f"Per task x shot setting, each method against scratch (`s`) and the nnU-Net baseline (`b`): per-case "
             f"differences (method − reference) over the validation cases of all folds, paired by fold and case; "
             f"mean difference with a bootstrap 95% confidence interval; two-sided Wilcoxon signed-rank p-value, "
             f"Holm-corrected across the methods compared with the same reference (α = {ALPHA}). Under "
             f"{MIN_PAIRS} pairs: \"{TOO_FEW}\". In the Dice tables, ↑s / ↓s (↑b / ↓b) mark Dice differences "
             f"that survive the correction. Full table: `statistics.csv`.\n"]
    if not statistics:
        return "\n".join(parts + ["No method has a reference (scratch or baseline) run in the same task and shot "
                                  "setting.\n"])
    rows = [{**r, "difference [95% CI]": _difference(r),
             "p (Holm)": r["note"] if r["note"] else f"{r['p_holm']:.3g}{' *' if r['significant'] else ''}"}
            for r in statistics]
    parts.append(markdown_table(rows, ["task", "shot", "metric", "method", "reference", "pairs",
                                       "difference [95% CI]", "p (Holm)"]))
    return "\n".join(parts)


def _difference(row: dict) -> str:
    if math.isnan(row["mean_difference"]):
        return "-"
    interval = "" if math.isnan(row["ci_low"]) else f" [{row['ci_low']:+.3f}, {row['ci_high']:+.3f}]"
    return f"{row['mean_difference']:+.3f}{interval}"
