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
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from nnssl.analysis import plots
from nnssl.analysis.fold_runs import FINISHED, MISSING, FoldRun, collect_runs, missing_runs
from nnssl.analysis.provenance_table import SHOWN, provenance_table
from nnssl.analysis.probe_table import MIN_METHODS, probe_tables, read_probes
from nnssl.analysis.protocol import alignment_rows, budget_rows, protocol_sections
from nnssl.analysis.references import report_baselines
from nnssl.analysis.review import Review, review
from nnssl.analysis.summary_tables import (average_ranks, convergence, convergence_table, dice_table, family_table,
                                           gap_table, group_rows, group_runs, method_key, modality_table,
                                           seed_noise_table, shot_key)
from nnssl.analysis.tables import markdown_table, write_csv
from nnssl.io import save_text
from nnssl.paths import nnunet_results

log = logging.getLogger(__name__)


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
        "folds": [_fold_row(r) for r in sorted(runs, key=lambda r: (r.task, *method_key(vars(r)), _fold_key(r.fold)))],
        "dice": dice_rows,
        "ranks": average_ranks(dice_rows),
        "gap": gap_table(dice_rows),
        "seed_noise": seed_noise_table(runs, dice_rows),
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
           "plans": run.plans, "method": run.method, "family": run.family, "fold": run.fold, "shot": run.shot,
           "status": run.status,
           "cases": len(run.case_dice), "dice_mean": float(np.mean(run.case_dice)) if run.case_dice else math.nan,
           "epochs": len(run.logging.get("ema_fg_dice", [])) or None}
    if run.logging.get("ema_fg_dice"):
        row.update(convergence(run.logging["ema_fg_dice"]))
    row["detail"] = run.detail
    return row


def _figures(runs: list[FoldRun], tables: dict[str, list[dict]], output: Path) -> list[tuple[str, str]]:
    """Write the PNGs; returns (title, file name) pairs for report.md."""
    methods = [r.method for r in sorted({r.method: r for r in runs}.values(), key=lambda r: method_key(vars(r)))]
    shots = sorted({r.shot for r in runs}, key=shot_key)
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
    for (shot, method), group in sorted(group_runs(runs, "shot", "method").items(),
                                        key=lambda item: (shot_key(item[0][0]), method_key(vars(item[1][0])))):
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
        "Mean ± standard deviation over all validation cases of all folds and seeds (per case: mean Dice over the "
        "foreground labels of nnU-Net's `summary.json`); rank within the task and shot setting in brackets "
        "(baseline rows, family `baseline`, are references: not ranked unless asked with --rank-baselines); "
        "↑s / ↓s, ↑b / ↓b: significantly better / worse than scratch / the baseline (Paired statistics). "
        "Full table: `dice.csv` (also the standard deviation of the fold means).\n",
    ]
    ranks = {(r["method"], r["shot"]): r["average_rank"] for r in tables["ranks"]}
    for (shot,), rows in sorted(group_rows(tables["dice"], "shot").items(), key=lambda i: shot_key(i[0][0])):
        by_method: dict[str, dict[str, Any]] = {}
        for row in rows:
            entry = by_method.setdefault(row["method"], {"method": row["method"], "family": row["family"]})
            rank = "reference" if math.isnan(row["rank"]) else f"{row['rank']:g}"
            marks = extras.marks.get((row["task"], shot, row["method"], "dice"), "")
            entry[row["task"]] = f"{_pm(row, 'dice_mean', 'dice_std')} ({rank}){' ' + marks if marks else ''}"
        for entry in by_method.values():
            entry["average rank"] = ranks[(entry["method"], shot)]
        columns = ["method", "family", *sorted({r["task"] for r in rows}), "average rank"]
        parts += [f"### {shot}\n", markdown_table(sorted(by_method.values(), key=method_key), columns, digits=2)]
    parts += extras.sections
    sections = [
        ("Average rank", "Mean rank over tasks per shot setting; `all` averages over every task and shot setting.",
         "ranks", ["method", "family", "shot", "tasks", "average_rank"]),
        ("Seed noise", "Many-shot folds fine-tuned once per seed of the plan's `seeds` (further seeds in plans "
         "variants `<plans>_seed<s>`): each seed's mean Dice over the folds every seed has, their standard deviation "
         "over seeds, beside the standard deviation over the task's ranked methods of their many-shot mean Dice, and "
         "the ratio of the two (near or above 1: the method differences are within seed noise). The Dice tables pool "
         "the seeds; paired statistics first average a case's Dice over the seeds of its fold.", "seed_noise",
         ["task", "method", "seeds", "folds", "seed_dice", "seed_std", "methods_std", "seed_to_methods"]),
        ("Few-shot to many-shot gap", "Many-shot mean Dice minus few-shot mean Dice (smaller is better).",
         "gap", ["task", "method", "shot", "many_shot_dice", "few_shot_dice", "gap", "relative_gap"]),
        ("Convergence", "From the EMA pseudo-Dice nnU-Net logs per epoch: epochs until it first reaches 90% "
         "and 95% of its final value, and its area under the curve per epoch (mean over epochs); averaged "
         "over the folds of every seed.", "convergence",
         ["task", "method", "shot", "folds", "seeds", "epochs", "epochs_to_90", "epochs_to_95", "auc",
          "final_pseudo_dice", "final_val_loss"]),
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
