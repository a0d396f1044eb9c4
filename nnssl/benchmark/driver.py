"""nnssl_benchmark's library call: plan the selected part of the study, then print it or run it."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from nnssl.benchmark.allocation import local_share
from nnssl.benchmark.cluster import ClusterSettings
from nnssl.benchmark.executor import FAILED, INTERRUPTED, SKIPPED, JobResult, format_summary, run_jobs
from nnssl.benchmark.jobs import DONE, KINDS, Job, Settings, StudyPlan, plan_study, select
from nnssl.benchmark.results_state import DiskState
from nnssl.benchmark.study import Study, load_study
from nnssl.errors import NnsslError
from nnssl.fewshot import load_fewshot
from nnssl.io import save_json
from nnssl.paths import dataset_folder, env_dir

log = logging.getLogger(__name__)

ROOT_VARIABLES = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnssl_results")


@dataclass
class BenchmarkOutcome:
    plan: StudyPlan
    text: str  # the dry-run listing, or the summary of what ran
    results: list[JobResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(r.status in (FAILED, SKIPPED, INTERRUPTED) for r in self.results)


def run_benchmark(tasks: list[str] | None = None, methods: list[str] | None = None, shots: list[str] | None = None,
                  folds: list[int] | None = None, gpus: int | None = None, dry_run: bool = False,
                  plan: str | Path | None = None, output: str | Path | None = None, device: str = "cuda",
                  corpus_dir: str | Path | None = None, jobs: int | None = None, executor: str = "local",
                  cluster: ClusterSettings | None = None, action: str = "run", wait: bool = False) -> BenchmarkOutcome:
    """Plan (and unless ``dry_run``, run) the selected part of the study; see ``nnssl_benchmark --help``.

    ``executor="slurm"`` submits it instead (:mod:`nnssl.benchmark.slurm`; ``cluster`` settings, ``wait`` for
    the jobs to end); ``action`` ``status``/``cancel`` shows/cancels the study's Slurm jobs, ``estimate``
    prints its GPU-hours.
    """
    if device not in ("cuda", "cpu"):
        raise NnsslError(f"--device must be cuda or cpu; got {device!r}.")
    if jobs is not None and device != "cpu":
        raise NnsslError("--jobs is for --device cpu; on GPUs, --gpus N runs one job per GPU.")
    study = load_study(plan)
    selection = select(study, tasks, methods, shots, folds)
    state = _disk_state(study, must_exist=not dry_run and action != "estimate")
    out = Path(output) if output else state.nnssl_results_dir / "benchmark"
    settings = Settings(output=out, device=device, corpus_dir=Path(corpus_dir) if corpus_dir else None)
    study_plan = plan_study(study, selection, settings, state)
    if action == "estimate":
        from nnssl.benchmark.estimate import estimate_study

        return BenchmarkOutcome(study_plan, estimate_study(study, study_plan, state))
    if executor == "slurm" or action in ("status", "cancel"):
        from nnssl.benchmark.slurm import run_slurm

        slurm_action = "dry-run" if dry_run else action if action in ("status", "cancel") else "submit"
        if slurm_action == "submit" and study_plan.missing:
            raise NnsslError("Some inputs of the study are missing:\n  " + "\n  ".join(study_plan.missing))
        text, results = run_slurm(study_plan, out, state.preprocessed_dir, cluster or ClusterSettings(), device,
                                  slurm_action, wait)
        if slurm_action == "submit" and wait:
            write_summary(results, out)
        return BenchmarkOutcome(study_plan, text, results)
    if dry_run:
        return BenchmarkOutcome(study_plan, format_plan(study_plan, out / "logs"))
    if study_plan.missing:
        raise NnsslError("Some inputs of the study are missing:\n  " + "\n  ".join(study_plan.missing))
    slots = cpu_slots(jobs) if device == "cpu" else gpu_slots(gpus)
    cores = local_share(len(slots))
    log.info("%d jobs, %d to run, on %s, %d core(s) each", len(study_plan.jobs),
             sum(j.state != DONE for j in study_plan.jobs),
             f"GPUs {slots}" if device != "cpu" else f"the CPU ({len(slots)} training job(s) at a time)", cores)
    results = run_jobs(study_plan.jobs, out / "logs", gpu_slots=slots, cores_per_job=cores,
                       check=lambda job: check_fewshot(job, state.preprocessed_dir))
    write_summary(results, out)
    return BenchmarkOutcome(study_plan, format_summary(results) + f"\nsummary: {out / 'summary.json'}", results)


def write_summary(results: list[JobResult], out: Path) -> None:
    save_json([{"id": r.job.id, "status": r.status, "returncode": r.returncode, "seconds": round(r.seconds, 1),
                "message": r.message, "log": r.log, "command": r.job.shell()} for r in results],
              out / "summary.json")


def _disk_state(study: Study, must_exist: bool) -> DiskState:
    """Folders from the environment; for a dry run an unset variable just means nothing exists yet."""
    roots = []
    for name in ROOT_VARIABLES:
        if must_exist or os.environ.get(name):
            roots.append(env_dir(name, must_exist=must_exist and name in ("nnUNet_raw", "nnUNet_preprocessed")))
        else:
            roots.append(Path(f"${name}"))
    return DiskState(*roots, study=study)


def cpu_slots(jobs: int | None) -> list[None]:
    """``jobs`` training jobs at a time on the CPU, each with its share of the cores (tiny networks run faster
    side by side than one after another on all cores)."""
    jobs = 1 if jobs is None else jobs
    if jobs < 1:
        raise NnsslError(f"--jobs must be >= 1; got {jobs}.")
    return [None] * jobs


def gpu_slots(count: int | None) -> list[str]:
    """GPU ids for ``count`` parallel jobs: the first of ``$CUDA_VISIBLE_DEVICES``, else 0..count-1."""
    visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if count is None:
        if visible:
            count = len(visible)
        else:
            import torch

            count = torch.cuda.device_count()
        if count == 0:
            raise NnsslError("No GPU found. Pass --gpus N, or --device cpu for a toy study on the CPU.")
    if count < 1:
        raise NnsslError(f"--gpus must be >= 1; got {count}. Use --device cpu to run without a GPU.")
    if visible and count > len(visible):
        raise NnsslError(f"--gpus {count}, but CUDA_VISIBLE_DEVICES={','.join(visible)} names {len(visible)}.")
    return visible[:count] if visible else [str(i) for i in range(count)]


def _fold_key(entry: dict | None) -> tuple | None:
    """What identifies a few-shot fold; other fields of its entry (e.g. uncovered_labels) are notes on it."""
    return None if entry is None else (entry["base_fold"], entry["shots"], entry["seed"])


def check_fewshot(job: Job, preprocessed: Path) -> str | None:
    """After ``nnssl_fewshot`` ran: do the folds in fewshot.json match those the fine-tuning jobs were given?"""
    if job.kind != "fewshot":
        return None
    folder = dataset_folder(preprocessed, job.command[1], "nnUNet_preprocessed")  # as nnssl_fewshot resolves it
    recorded = load_fewshot(folder)
    wrong = [(fold, base, shots, seed) for fold, base, shots, seed in job.expects
             if _fold_key(recorded.get(str(fold))) != (base, shots, seed)]
    if wrong:
        fold, base, shots, seed = wrong[0]
        return (f"fewshot.json of {folder.name} does not give fold {fold} to {shots}-shot/base fold {base}/seed {seed} "
                f"as planned ({len(wrong)} such fold(s)); run nnssl_benchmark again: it plans from fewshot.json")
    return None


def format_plan(plan: StudyPlan, log_dir: Path) -> str:
    """The dry-run listing: every job's state and exact command, grouped by kind, then missing inputs."""
    lines = [f"# {len(plan.jobs)} jobs: {sum(j.state != DONE for j in plan.jobs)} to run, "
             f"{sum(j.state == DONE for j in plan.jobs)} already done. GPU jobs get CUDA_VISIBLE_DEVICES=<one GPU> "
             f"at run time; logs go to {log_dir}/<job>.log"]
    for kind in KINDS:
        group = [j for j in plan.jobs if j.kind == kind]
        if group:
            counts = ", ".join(f"{sum(j.state == s for j in group)} {s}" for s in dict.fromkeys(j.state for j in group))
            lines.append(f"\n## {kind} ({len(group)}: {counts})")
            lines += [f"[{j.state}] {j.shell()}" for j in group]
    if plan.budgets:
        lines.append("\n## pretraining budget (optimizer steps x volumes per step, per method)")
        lines += [f"- {budget.describe()}" for budget in plan.budgets.values()]
    if plan.missing:
        lines.append("\n## missing inputs (the run stops until they exist)")
        lines += [f"- {m}" for m in plan.missing]
    return "\n".join(lines)

