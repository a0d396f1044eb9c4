"""Run a job graph: one job per GPU at a time, CPU jobs beside them, a log file per job, a progress bar.

A job starts when every job in its ``deps`` succeeded (or was already ``done``) and every job in its
``after`` has finished in any way; a job whose dependency failed is skipped, and so are its dependents.
GPU jobs get ``CUDA_VISIBLE_DEVICES`` set to their slot's GPU, and every job its share of the cores
(:mod:`nnssl.benchmark.allocation`). On Ctrl-C the running commands get SIGINT
(``nnssl_pretrain`` saves a checkpoint on it), then the summary is written; nothing is lost that
``--c``/``--resume`` cannot continue.
"""
from __future__ import annotations

import datetime
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from tqdm import tqdm

from nnssl.benchmark.allocation import describe_share, share_env
from nnssl.benchmark.jobs import DONE, Job

log = logging.getLogger(__name__)

OK, FAILED, SKIPPED, ALREADY_DONE, INTERRUPTED = "ok", "failed", "skipped", "done", "interrupted"
GRACE_SECONDS = 60  # after Ctrl-C, how long running commands may take to save and stop


@dataclass
class JobResult:
    job: Job
    status: str
    returncode: int | None = None
    log: Path | None = None
    message: str = ""
    seconds: float = 0.0


@dataclass
class _Running:
    job: Job
    process: subprocess.Popen | None  # None: the command could not be started (see the log)
    slot: str | None
    log: Path
    handle: object
    start: float


def log_path(log_dir: Path, job: Job) -> Path:
    return log_dir / f"{job.id.replace('/', '__')}.log"


def run_jobs(jobs: Sequence[Job], log_dir: Path, gpu_slots: Sequence[str | None] = (None,), cpu_slots: int = 1,
             check: Callable[[Job], str | None] | None = None, poll_seconds: float = 0.1,
             env: dict[str, str] | None = None, cores_per_job: int | None = None) -> list[JobResult]:
    """Run ``jobs`` (``done`` ones are not run) and return one result per job, in the order given.

    ``gpu_slots``: one entry per GPU job that may run at once, the value of ``CUDA_VISIBLE_DEVICES`` for it
    (None: leave the variable as it is). ``env``: variables set for every command (a job's own win).
    ``cores_per_job``: each job's share of the cores, turned into its thread and worker-process counts.
    ``check(job)``, called after a job exited 0, may return a message that turns the job into a failure
    (e.g. its output disagrees with what later jobs were planned on).
    """
    if not gpu_slots or cpu_slots < 1:
        raise ValueError(f"run_jobs needs at least one GPU slot (None: no GPU) and one CPU slot; got "
                         f"{list(gpu_slots)} and {cpu_slots}")
    log_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, JobResult] = {j.id: JobResult(j, ALREADY_DONE) for j in jobs if j.state == DONE}
    waiting = [j for j in jobs if j.state != DONE]
    free_gpus, free_cpus = list(gpu_slots), cpu_slots
    running: list[_Running] = []
    bar = tqdm(total=len(waiting), desc="nnssl_benchmark", unit="job")
    shown: dict[str, int] = {}
    try:
        while waiting or running:
            for job in list(waiting):
                blocked = _blocked_by(job, results)
                if blocked:
                    waiting.remove(job)
                    results[job.id] = JobResult(job, SKIPPED, message=f"dependency {blocked} did not succeed")
                    bar.update()
                    continue
                if not _ready(job, results) or (job.gpu and not free_gpus) or (not job.gpu and free_cpus < 1):
                    continue
                waiting.remove(job)
                started = _start(job, free_gpus.pop(0) if job.gpu else None, log_dir, env or {}, cores_per_job)
                free_cpus -= not job.gpu
                running.append(started)
            time.sleep(poll_seconds if running else 0)
            for item in [r for r in running if r.process is None or r.process.poll() is not None]:
                running.remove(item)
                item.handle.close()
                if item.job.gpu:
                    free_gpus.append(item.slot)
                else:
                    free_cpus += 1
                results[item.job.id] = result = _finish(item, check)
                if result.status != OK:
                    tqdm.write(f"nnssl_benchmark: {item.job.id} failed ({result.message}); log: {item.log}")
                bar.update()
            status = {"running": len(running), "failed": sum(r.status == FAILED for r in results.values())}
            if status != shown:  # redraw only on change: logs of a week-long run stay readable
                bar.set_postfix(status)
                shown = status
            if not running and waiting and not any(_ready(j, results) for j in waiting):
                # every remaining job waits on something that will never finish: a cycle or an unknown id
                for job in waiting:
                    results[job.id] = JobResult(job, SKIPPED, message="dependencies can never be met")
                waiting.clear()
    except KeyboardInterrupt:
        _stop(running, results)
        for job in waiting:
            results[job.id] = JobResult(job, INTERRUPTED, message="not started")
    finally:
        bar.close()
    return [results[j.id] for j in jobs]


def _blocked_by(job: Job, results: dict[str, JobResult]) -> str | None:
    for dep in job.deps:
        result = results.get(dep)
        if result is not None and result.status not in (OK, ALREADY_DONE):
            return dep
    return None


def _ready(job: Job, results: dict[str, JobResult]) -> bool:
    return all(d in results for d in job.deps) and all(a in results for a in job.after)


def job_environment(job: Job, common_env: dict[str, str], cores: int | None) -> dict[str, str]:
    """The environment of ``job``'s command: ours, the common variables, its share of ``cores`` (if given),
    then the job's own variables (the plan's), which win."""
    share = share_env(job, cores) if cores else {}
    env = {**os.environ, **common_env, **share, **dict(job.env)}
    # the console scripts of this installation (nnUNetv2_train, nnssl_*) even when its venv is not activated
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def log_header(job: Job, env: dict[str, str], where: str = "") -> str:
    """The line that starts each run of a job in its log: when, state, where, threads, command."""
    threads = describe_share(env)
    return (f"=== {datetime.datetime.now().isoformat(timespec='seconds')} [{job.state}]{where}"
            f"{f' ({threads})' if threads else ''}: {job.shell()}\n")


def _start(job: Job, slot: str | None, log_dir: Path, common_env: dict[str, str], cores: int | None) -> _Running:
    env = job_environment(job, common_env, cores)
    if job.gpu and slot is not None:
        env["CUDA_VISIBLE_DEVICES"] = slot
    path = log_path(log_dir, job)
    handle = open(path, "a")  # a resumed job continues its log
    handle.write(log_header(job, env, f" (CUDA_VISIBLE_DEVICES={slot})" if job.gpu and slot is not None else ""))
    handle.flush()
    try:
        process = subprocess.Popen(job.command, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
    except OSError as err:  # e.g. the console script is not installed: a failed job, not a crashed driver
        handle.write(f"could not start: {err}\n")
        process = None
    return _Running(job, process, slot, path, handle, time.monotonic())


def _finish(item: _Running, check: Callable[[Job], str | None] | None) -> JobResult:
    seconds = time.monotonic() - item.start
    if item.process is None:
        return JobResult(item.job, FAILED, None, item.log, f"could not start {item.job.command[0]}", seconds)
    code = item.process.returncode
    if code != 0:
        return JobResult(item.job, FAILED, code, item.log, f"exit status {code}", seconds)
    message = check(item.job) if check else None
    if message:
        with open(item.log, "a") as f:
            f.write(f"nnssl_benchmark: {message}\n")
        return JobResult(item.job, FAILED, code, item.log, message, seconds)
    return JobResult(item.job, OK, code, item.log, "", seconds)


def _stop(running: list[_Running], results: dict[str, JobResult]) -> None:
    for item in running:
        if item.process is not None and item.process.poll() is None:
            item.process.send_signal(signal.SIGINT)
    deadline = time.monotonic() + GRACE_SECONDS
    for item in running:
        if item.process is not None:
            try:
                item.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                item.process.kill()
                item.process.wait()
        item.handle.close()
        results[item.job.id] = JobResult(item.job, INTERRUPTED, item.process and item.process.returncode,
                                         item.log, "stopped by Ctrl-C", time.monotonic() - item.start)


def format_summary(results: Sequence[JobResult],
                   statuses: Sequence[str] = (OK, ALREADY_DONE, FAILED, SKIPPED, INTERRUPTED)) -> str:
    """Counts per status (columns ``statuses``) and kind, then every job that did not succeed with its reason
    and log."""
    kinds = list(dict.fromkeys(r.job.kind for r in results))
    lines = [f"{'jobs':<10}" + "".join(f"{s:>12}" for s in statuses)]
    for kind in kinds:
        counts = [sum(r.job.kind == kind and r.status == s for r in results) for s in statuses]
        lines.append(f"{kind:<10}" + "".join(f"{c:>12}" for c in counts))
    bad = [r for r in results if r.status in (FAILED, SKIPPED, INTERRUPTED)]
    if bad:
        lines.append(f"\n{len(bad)} job(s) did not succeed:")
        lines += [f"  {r.status:<11} {r.job.id}: {r.message}" + (f" (log: {r.log})" if r.log else "") for r in bad]
    elif all(r.status in (OK, ALREADY_DONE) for r in results):
        lines.append("\nall jobs succeeded")
    else:
        lines.append("\nno job failed so far")
    return "\n".join(lines)
