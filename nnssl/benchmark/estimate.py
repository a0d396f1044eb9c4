"""``nnssl_benchmark --estimate``: per job kind, how many jobs are left and their GPU-hours.

Measured where a run exists (the epoch times nnU-Net logs for finished fine-tunings; seconds per step in a
pretraining run's ``log.csv``), else from the plan's ``estimates`` section, and labelled as which.
"""
from __future__ import annotations

import csv
import re
import statistics
from pathlib import Path

from nnssl.benchmark.jobs import DONE, DiskState, StudyPlan
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


def estimate_study(study: Study, plan: StudyPlan, state: DiskState) -> str:
    """The table ``--estimate`` prints."""
    rows = []
    todo = [j for j in plan.jobs if j.state != DONE]
    finetunes = [j for j in todo if j.kind == "finetune"]
    if finetunes:
        measured = measured_finetune_hours(study, state)
        if measured:
            hours, count = measured
            rows.append(("finetune", len(finetunes), f"{hours * len(finetunes):,.1f}",
                         f"measured: {hours:.2f} h per run, mean of {count} finished run(s)"))
        else:
            planned = _plan_hours(study, "finetune_run")
            rows.append(("finetune", len(finetunes), "?" if planned is None else
                         f"{planned[0] * len(finetunes):,.0f}-{planned[1] * len(finetunes):,.0f}",
                         "plan estimate (estimates.finetune_run)" if planned else "no estimate in the plan"))
    pretrains = [j for j in todo if j.kind == "pretrain"]
    if pretrains:
        hours = [measured_pretrain_hours(state.nnssl_results_dir / j.command[2] / study.corpus_run)
                 for j in pretrains]
        known = [h for h in hours if h is not None]
        planned = _plan_hours(study, "pretrain_run")
        basis = f"measured for {len(known)} of {len(pretrains)} run(s) (log.csv)" if known else \
            "plan estimate (estimates.pretrain_run)" if planned else "not measured, no estimate in the plan"
        total = f"{sum(known):,.1f}" + ("+?" if len(known) < len(pretrains) else "") if known else \
            f"{planned[0] * len(pretrains):,.0f}-{planned[1] * len(pretrains):,.0f}" if planned else "?"
        rows.append(("pretrain", len(pretrains), total, basis + " x GPUs of the job"))
    for kind in dict.fromkeys(j.kind for j in todo):
        if kind not in ("finetune", "pretrain"):
            count = sum(j.kind == kind for j in todo)
            gpu = any(j.gpu for j in todo if j.kind == kind)
            rows.append((kind, count, "?" if gpu else "0", "not estimated (short)" if gpu else "CPU only"))
    width = max([len(r[0]) for r in rows] + [4])
    lines = [f"# {len(todo)} of {len(plan.jobs)} jobs left to run ({study.source})",
             f"{'kind':<{width}}  {'jobs':>6}  {'GPU-hours':>14}  basis"]
    lines += [f"{kind:<{width}}  {count:>6}  {hours:>14}  {basis}" for kind, count, hours, basis in rows]
    return "\n".join(lines)
