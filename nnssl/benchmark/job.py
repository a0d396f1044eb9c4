"""One job of the study (:class:`Job`) and the settings every job's command is built with.

Its own module so that the job planners (:mod:`nnssl.benchmark.jobs`, :mod:`nnssl.benchmark.probe_jobs`) and the
executors share them without importing each other.
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass, replace
from pathlib import Path

from nnssl.benchmark.results_state import NEW


@dataclass(frozen=True)
class Job:
    """One command of the study. ``deps`` must succeed first; ``after`` must only have finished."""

    id: str
    kind: str
    command: tuple[str, ...]
    state: str = NEW
    deps: tuple[str, ...] = ()
    after: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    gpu: bool = False
    # fewshot jobs: (fold, base_fold, shots, seed) the fine-tuning commands rely on, checked after the job ran
    expects: tuple[tuple[int, int, int, int], ...] = ()

    def shell(self) -> str:
        """The command as one shell line, environment assignments first."""
        return " ".join([f"{k}={_quote(v)}" for k, v in self.env] + [_quote(c) for c in self.command])


RESUME_FLAGS = {"pretrain": "--resume", "finetune": "--c"}  # both start afresh when there is nothing to continue


def resumable(job: Job) -> Job:
    """``job`` with its continue flag (``nnssl_pretrain --resume``, ``nnUNetv2_train --c``) whatever the disk
    holds now: a job that is requeued after a time limit or preemption continues from its last checkpoint."""
    flag = RESUME_FLAGS.get(job.kind)
    if flag is None or flag in job.command:
        return job
    return replace(job, command=(*job.command, flag))


def _quote(arg: str) -> str:
    # "$nnUNet_results/..." (a dry run with the variable unset) stays expandable when pasted into a shell
    if arg.startswith("$") and shlex.quote(arg[1:]) == arg[1:]:
        return f'"{arg}"'
    return shlex.quote(arg)


@dataclass(frozen=True)
class Settings:
    output: Path  # logs, CKA results and the report go below it
    device: str = "cuda"  # "cpu": every job runs on the CPU (tiny studies, tests)
    corpus_dir: Path | None = None


def job_ids(*jobs: Job | None) -> tuple[str, ...]:
    return tuple(job.id for job in jobs if job is not None)


def device_flag(settings: Settings) -> tuple[str, ...]:
    """nnU-Net's (and nnssl_cka's) way to ask for the CPU; nnssl_pretrain spells it --device."""
    return ("-device", "cpu") if settings.device == "cpu" else ()
