"""``nnssl_benchmark --estimate``: per job kind, how many jobs are left and their GPU-hours.

Measured where a run exists (the epoch times nnU-Net logs for finished fine-tunings; seconds per step in a
pretraining run's ``log.csv``), else from the plan's ``estimates`` section, and labelled as which.
"""
from __future__ import annotations

import csv
import re
import statistics
from pathlib import Path

from nnssl.benchmark.jobs import StudyPlan
from nnssl.benchmark.results_state import DONE, DiskState
from nnssl.benchmark.study import Study
from nnssl.io import load_json
from nnssl.plans import load_plan

_RANGE = re.compile(r"(\d[\d,]*(?:\.\d+)?)\s*-\s*(\d[\d,]*(?:\.\d+)?)")
_EPOCH_TIME = re.compile(r"Epoch time: ([\d.]+) s")
NNUNET_EPOCHS = 1000


def _plan_hours(study: Study, key: str) -> tuple[float, float] | None:
    """The ``estimates.<key>.gpu_hours`` range of the plan ("30-50 on one A100"), if it gives one."""
    entry = load_plan(str(study.source)).get("estimates", {}).get(key, {})
    match = _RANGE.search(str(entry.get("gpu_hours", "")))
    return (float(match[1].replace(",", "")), float(match[2].replace(",", ""))) if match else None


def measured_finetune_hours(study: Study, state: DiskState) -> tuple[float, int] | None:
    """Mean hours of a whole fine-tuning (mean epoch time x the study's epochs) over finished runs."""
    epochs = int(study.finetune_env.get("nnssl_num_epochs", NNUNET_EPOCHS))
    runs = []
    for task in study.tasks.values():
        for method in study.methods.values():
            folder = state.model_folder(task.dataset, method.trainer)
            for logfile in folder.glob("fold_*/training_log_*.txt"):
                times = [float(t) for t in _EPOCH_TIME.findall(logfile.read_text(errors="replace"))]
                if times:
                    runs.append(statistics.mean(times) * epochs / 3600)
    return (statistics.mean(runs), len(runs)) if runs else None


def measured_pretrain_hours(run: Path) -> float | None:
    """Hours of the whole run from its seconds per step so far (``log.csv``) and its total steps."""
    log, config = run / "log.csv", run / "config.json"
    if not log.is_file() or not config.is_file():
        return None
    with open(log, newline="", encoding="utf-8") as f:
        rows = [(int(r["step"]), float(r["time"])) for r in csv.DictReader(f) if r.get("time")]
    settings = load_json(config)
    if len(rows) < 2 or not settings.get("steps_per_epoch") or rows[-1][0] == rows[0][0]:
        return None
    per_step = (rows[-1][1] - rows[0][1]) / (rows[-1][0] - rows[0][0])
    return per_step * settings["epochs"] * settings["steps_per_epoch"] / 3600


Hours = tuple[float, float] | None  # low and high GPU-hours; None: unknown


def estimate_study(study: Study, plan: StudyPlan, state: DiskState) -> str:
    """The table ``--estimate`` prints: kind, jobs left, GPU-hours, basis; then the total."""
    rows: list[tuple[str, int, Hours, str]] = []
    todo = [j for j in plan.jobs if j.state != DONE]
    finetunes = [j for j in todo if j.kind == "finetune"]
    if finetunes:
        measured = measured_finetune_hours(study, state)
        planned = _plan_hours(study, "finetune_run")
        if measured:
            hours, count = measured
            rows.append(("finetune", len(finetunes), (hours * len(finetunes),) * 2,
                         f"measured: {hours:.2f} h per run, mean of {count} finished run(s)"))
        else:
            rows.append(("finetune", len(finetunes), planned and (planned[0] * len(finetunes),
                                                                   planned[1] * len(finetunes)),
                         "plan estimate (estimates.finetune_run)" if planned else "no estimate in the plan"))
    pretrains = [j for j in todo if j.kind == "pretrain"]
    if pretrains:
        known = [h for h in (measured_pretrain_hours(state.nnssl_results_dir / j.command[2] / study.corpus_run)
                             for j in pretrains) if h is not None]
        planned = _plan_hours(study, "pretrain_run")
        if len(known) == len(pretrains):
            rows.append(("pretrain", len(pretrains), (sum(known),) * 2,
                         "measured (seconds per step in each run's log.csv) x GPUs of the job"))
        else:
            rows.append(("pretrain", len(pretrains), planned and (planned[0] * len(pretrains),
                                                                   planned[1] * len(pretrains)),
                         (f"measured for {len(known)} of {len(pretrains)} run(s) only; " if known else "") +
                         ("plan estimate (estimates.pretrain_run)" if planned else "no estimate in the plan")))
    for kind in dict.fromkeys(j.kind for j in todo):
        if kind not in ("finetune", "pretrain"):
            count = sum(j.kind == kind for j in todo)
            gpu = any(j.gpu for j in todo if j.kind == kind)
            rows.append((kind, count, None if gpu else (0.0, 0.0), "not estimated" if gpu else "CPU only"))
    known_rows = [r[2] for r in rows if r[2] is not None]
    total = (sum(h[0] for h in known_rows), sum(h[1] for h in known_rows))
    unknown = [r[0] for r in rows if r[2] is None]
    rows.append(("total", len(todo), total, f"without {', '.join(unknown)}" if unknown else "all kinds"))
    width = max(len(r[0]) for r in rows)
    lines = [f"# {len(todo)} of {len(plan.jobs)} jobs left to run ({study.source})",
             f"{'kind':<{width}}  {'jobs':>6}  {'GPU-hours':>15}  basis"]
    lines += [f"{kind:<{width}}  {count:>6}  {_hours(hours):>15}  {basis}" for kind, count, hours, basis in rows]
    return "\n".join(lines)


def _hours(hours: Hours) -> str:
    if hours is None:
        return "?"
    low, high = hours
    return f"{low:,.0f}" if round(low) == round(high) else f"{low:,.0f}-{high:,.0f}"
