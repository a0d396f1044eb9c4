"""``nnssl_benchmark --executor slurm``: the study's job graph submitted to Slurm through submitit.

The graph and the "is it done" checks are the planner's (:mod:`nnssl.benchmark.jobs`), as for the local
executor. Every job that is not done is submitted once: a dependency (``deps``) becomes ``afterok`` on the
Slurm job that makes it, ``after`` (the report) ``afterany``; jobs with the same dependencies and kind (the
fine-tunings of one task and method) go into one job array. ``--kill-on-invalid-dep=yes`` makes Slurm cancel
the dependents of a failed job, which ``--status`` shows as skipped, naming the dependency.

Submitted job ids are recorded in ``<output>/slurm/jobs.json``; what ran writes its outcome to
``<output>/slurm/outcomes/`` and its output to ``<output>/logs/<job>.log``; submitit keeps its own files in
``<output>/slurm/submitit/``. Running the same command again asks squeue for the recorded jobs: queued and
running ones are left alone, done ones (by the files on disk) skipped, and only failed, cancelled, skipped or
never submitted work is submitted again, depending on the queued jobs it needs.
"""
from __future__ import annotations

import datetime
import logging
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from nnssl.benchmark.cluster import ClusterSettings, sbatch_options, to_dict
from nnssl.benchmark.executor import ALREADY_DONE, FAILED, INTERRUPTED, OK, SKIPPED, JobResult, log_path
from nnssl.benchmark.job import Job, resumable
from nnssl.benchmark.jobs import DONE, StudyPlan
from nnssl.benchmark.slurm_job import SlurmCommand, outcome_path
from nnssl.errors import NnsslError
from nnssl.io import load_json, save_json

log = logging.getLogger(__name__)

QUEUED, RUNNING, MISSING = "queued", "running", "missing"
STATUSES = (QUEUED, RUNNING, OK, ALREADY_DONE, FAILED, SKIPPED, INTERRUPTED, MISSING)
RECORDS = "jobs.json"
_ARRAY_TASK = re.compile(r"^\d+_\d+$")
# squeue's job states (long form) that mean "still coming"
_WAITING = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "SUSPENDED", "STOPPED"}
_ACTIVE = {"RUNNING", "CONFIGURING", "COMPLETING", "RESIZING", "SIGNALING", "STAGE_OUT"}


@dataclass
class Submission:
    """One sbatch call: a job, or an array of jobs of one kind with the same dependencies."""

    jobs: list[Job]
    options: dict[str, str]  # sbatch options; dependencies name study job ids until they are submitted
    needs: dict[str, tuple[str, ...]]  # "afterok"/"afterany" -> study job ids it waits for


def slurm_folder(output: Path) -> Path:
    return output / "slurm"


def require_slurm() -> None:
    missing = [tool for tool in ("sbatch", "squeue", "scancel") if shutil.which(tool) is None]
    if missing:
        raise NnsslError(f"--executor slurm needs Slurm's {', '.join(missing)} on PATH; run nnssl_benchmark on a "
                         f"Slurm login node (or use the default --executor local).")


# -- what Slurm and the study folder know --------------------------------------------------------------------
def load_records(output: Path) -> dict[str, dict]:
    path = slurm_folder(output) / RECORDS
    return load_json(path, fix=f"delete {path} and cancel the study's jobs with scancel, then submit again") \
        if path.is_file() else {}


def squeue_states(slurm_ids: Sequence[str]) -> dict[str, tuple[str, str]]:
    """``{job id: (state, reason)}`` of the given jobs that squeue still lists (array tasks one by one)."""
    if not slurm_ids:
        return {}
    # all of this user's jobs: squeue -j fails as a whole when one id is already forgotten (MinJobAge)
    result = subprocess.run(["squeue", "--me", "-h", "-r", "-t", "all", "-o", "%i|%T|%r"], capture_output=True,
                            text=True)
    if result.returncode != 0:
        raise NnsslError(f"squeue failed ({result.stderr.strip()}); is Slurm reachable from this machine?")
    wanted = set(slurm_ids)
    states = {}
    for line in result.stdout.splitlines():
        slurm_id, state, reason = (line.split("|") + ["", ""])[:3]
        if slurm_id.strip() in wanted:
            states[slurm_id.strip()] = (state.strip(), reason.strip())
    return states


def job_statuses(plan: StudyPlan, output: Path, records: dict[str, dict],
                 live: dict[str, tuple[str, str]]) -> list[JobResult]:
    """Where each job of ``plan`` stands: queued, running, ok/done, failed, skipped (a dependency did not
    succeed), interrupted (cancelled or killed without an outcome) or missing (never submitted)."""
    results: dict[str, JobResult] = {}
    for job in plan.jobs:
        results[job.id] = _status(job, output, records.get(job.id), live, results)
    return [results[j.id] for j in plan.jobs]


def _status(job: Job, output: Path, record: dict | None, live: dict[str, tuple[str, str]],
            earlier: dict[str, JobResult]) -> JobResult:
    logfile = log_path(output / "logs", job)
    outcome = _outcome(output, job, record)
    if job.state == DONE:  # its files exist: "ok" when this study's Slurm job made them, else done before it
        return _finished(job, outcome, record, logfile) if outcome.get("status") == "ok" else \
            JobResult(job, ALREADY_DONE, log=logfile)
    if record is None:
        return JobResult(job, MISSING, message="not submitted")
    slurm_id = record["slurm_id"]
    state, reason = live.get(slurm_id, ("", ""))
    where = f"Slurm job {slurm_id}"
    if state in _WAITING:
        return JobResult(job, QUEUED, log=logfile, message=f"{where} {state.lower()} ({reason})")
    if state in _ACTIVE:
        return JobResult(job, RUNNING, log=logfile, message=f"{where} {state.lower()}")
    if outcome:
        return _finished(job, outcome, record, logfile)
    blocked = [d for d in job.deps if d in earlier and earlier[d].status not in (OK, ALREADY_DONE)]
    if blocked or reason == "DependencyNeverSatisfied":
        return JobResult(job, SKIPPED, message=f"{where} cancelled: dependency {blocked[0] if blocked else '?'} "
                                               f"did not succeed")
    if state in ("FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE", "PREEMPTED"):
        return JobResult(job, FAILED, log=logfile, message=f"{where} {state.lower()} ({reason})")
    return JobResult(job, INTERRUPTED, log=logfile,
                     message=f"{where} ended without an outcome ({state.lower() or 'no longer in squeue'}: "
                             f"cancelled or killed)")


def _outcome(output: Path, job: Job, record: dict | None) -> dict:
    """The outcome ``job``'s Slurm job ``record`` wrote ({} when none, or one of an earlier submission)."""
    outcome_file = outcome_path(slurm_folder(output) / "outcomes", job.id)
    if record is None or not outcome_file.is_file():
        return {}
    outcome = load_json(outcome_file)
    return outcome if outcome.get("slurm_id") == record["slurm_id"] else {}


def _finished(job: Job, outcome: dict, record: dict, logfile: Path) -> JobResult:
    message = outcome.get("message", "") and f"Slurm job {record['slurm_id']}: {outcome['message']}"
    return JobResult(job, OK if outcome["status"] == "ok" else FAILED, outcome.get("returncode"), logfile, message,
                     outcome.get("seconds", 0.0))


# -- what to submit ------------------------------------------------------------------------------------------
def plan_submissions(plan: StudyPlan, statuses: Sequence[JobResult], records: dict[str, dict],
                     cluster: ClusterSettings, device: str) -> tuple[list[Submission], dict[str, str]]:
    """The sbatch calls that bring the study up to date, in submission order, and the jobs left alone
    (``{study id: Slurm id}`` of those queued or running). Done jobs, and the report once it succeeded with
    nothing before it submitted again, are not submitted."""
    by_id = {r.job.id: r for r in statuses}
    waiting = {r.job.id for r in statuses if r.status in (QUEUED, RUNNING)}
    submit: list[Job] = []
    for job in plan.jobs:
        status = by_id[job.id].status
        if status in (QUEUED, RUNNING) or job.state == DONE:  # done: its files exist, whoever made them
            continue
        submitted = {j.id for j in submit}
        if status == OK and not any(d in submitted for d in (*job.deps, *job.after)):
            continue  # a job without a file to check (the report) that succeeded
        submit.append(job)
    groups: dict[tuple, list[Job]] = {}
    for job in submit:  # each array task keeps its own command and environment (nnssl_seed, ...)
        groups.setdefault((job.kind, job.deps, job.after), []).append(job)
    submissions = []
    pending = waiting | {j.id for j in submit}  # done dependencies need no Slurm dependency
    for (kind, deps, after), jobs in groups.items():
        needs = {"afterok": tuple(d for d in deps if d in pending), "afterany": tuple(a for a in after if a in pending)}
        name = "nnssl-" + (jobs[0].id if len(jobs) == 1 else jobs[0].id.rsplit("/", 1)[0]).replace("/", "-")
        submissions.append(Submission(jobs, sbatch_options(cluster, jobs[0], device, name, None),
                                      {k: v for k, v in needs.items() if v}))
    return submissions, {j: records[j]["slurm_id"] for j in waiting}


def dependency(needs: dict[str, tuple[str, ...]], slurm_ids: dict[str, str]) -> str | None:
    """``afterok:1:2_3,afterany:4`` from study ids (a dry run passes ids to themselves). ``afterany`` names
    whole arrays (the report waits for every task of them anyway): 90 arrays, not 1,800 tasks."""
    parts = []
    for kind, ids in needs.items():
        names = [slurm_ids[i] for i in ids]
        if kind == "afterany":
            names = list(dict.fromkeys(n.split("_")[0] if _ARRAY_TASK.match(n) else n for n in names))
        if names:
            parts.append(f"{kind}:" + ":".join(names))
    return ",".join(parts) or None


def format_submissions(submissions: Sequence[Submission], cluster: ClusterSettings, left_alone: dict[str, str],
                       output: Path) -> str:
    """The dry-run listing: each sbatch call with its options, then the command of each job (array task)."""
    count = sum(len(s.jobs) for s in submissions)
    lines = [f"# --executor slurm: {len(submissions)} submission(s), {count} job(s), "
             f"{sum(len(s.jobs) > 1 for s in submissions)} of them arrays; {len(left_alone)} job(s) already queued "
             f"or running are left alone. Dependencies name queued jobs by Slurm id, the others as <study job> until they are submitted. "
             f"Each job runs its command through submitit ({slurm_folder(output) / 'submitit'}), output in "
             f"{output / 'logs'}/<job>.log"]
    for submission in submissions:
        options = dict(submission.options)
        dep = dependency(submission.needs, {i: left_alone.get(i, f"<{i}>") for ids in submission.needs.values()
                                            for i in ids})
        if dep:
            options["dependency"] = dep
        options["signal"] = f"USR2@{cluster.signal_delay_s}"
        if len(submission.jobs) > 1:
            options["array"] = f"0-{len(submission.jobs) - 1}%{min(len(submission.jobs), cluster.array_parallelism)}"
        lines.append("\nsbatch " + " ".join(f"--{k}" if v == "" else f"--{k}={shlex.quote(v)}"
                                            for k, v in options.items()))
        for index, job in enumerate(submission.jobs):
            prefix = f"  [{index}] " if len(submission.jobs) > 1 else "  "
            lines.append(f"{prefix}{resumable(job).shell()}")
    return "\n".join(lines)


# -- submitting, waiting, cancelling -------------------------------------------------------------------------
def submit(submissions: Sequence[Submission], cluster: ClusterSettings, output: Path, preprocessed: Path,
           left_alone: dict[str, str]) -> dict[str, str]:
    """Submit in order through submitit; returns ``{study id: Slurm id}`` of what was submitted. Records are
    saved after each sbatch call, so an interrupted submission is continued, not repeated, by the next run."""
    import submitit

    folder = slurm_folder(output)
    records = load_records(output)
    slurm_ids = dict(left_alone)
    submitted: dict[str, str] = {}
    for submission in tqdm(submissions, desc="sbatch", unit="submission", disable=len(submissions) < 10):
        dep = dependency(submission.needs, slurm_ids)
        # a fresh executor per call: parameters of the previous submission (its GPUs) must not carry over
        executor = submitit.SlurmExecutor(folder=folder / "submitit", max_num_timeout=cluster.max_requeues)
        executor.update_parameters(**_submitit_parameters(submission.options, dep, cluster))
        commands = [SlurmCommand(job, output / "logs", folder / "outcomes", preprocessed if job.kind == "fewshot"
                                 else None) for job in submission.jobs]
        if len(commands) == 1:
            handles = [executor.submit(commands[0])]
        else:
            with executor.batch():
                handles = [executor.submit(command) for command in commands]
        now = datetime.datetime.now().isoformat(timespec="seconds")
        for job, handle in zip(submission.jobs, handles):
            slurm_ids[job.id] = submitted[job.id] = handle.job_id
            records[job.id] = {"slurm_id": handle.job_id, "submitted": now, "command": resumable(job).shell(),
                               "dependency": dep or ""}
        save_json(records, folder / RECORDS)
    save_json(to_dict(cluster), folder / "cluster.json")
    return submitted


def _submitit_parameters(options: dict[str, str], dep: str | None, cluster: ClusterSettings) -> dict:
    """submitit's names for what it writes itself; every other sbatch option as it is."""
    named = {"job-name": "job_name", "time": "time", "nodes": "nodes", "ntasks-per-node": "ntasks_per_node",
             "cpus-per-task": "cpus_per_task", "gpus-per-node": "gpus_per_node", "partition": "partition",
             "account": "account", "qos": "qos", "constraint": "constraint"}
    parameters: dict = {"signal_delay_s": cluster.signal_delay_s, "array_parallelism": cluster.array_parallelism,
                        "stderr_to_stdout": True, "dependency": dep}
    extra = {}
    for key, value in options.items():
        if key in named:
            parameters[named[key]] = int(value) if key in ("time", "nodes", "ntasks-per-node", "cpus-per-task",
                                                           "gpus-per-node") else value
        else:
            extra[key] = True if value == "" else value
    parameters["additional_parameters"] = extra
    return parameters


def wait_for(plan: StudyPlan, output: Path, poll_seconds: float = 5.0) -> list[JobResult]:
    """Poll until no job of the study is queued or running; a progress bar counts finished jobs."""
    bar = tqdm(total=len(plan.jobs), desc="nnssl_benchmark (slurm)", unit="job")
    shown: dict[str, int] = {}
    try:
        while True:
            records = load_records(output)
            statuses = job_statuses(plan, output, records, squeue_states([r["slurm_id"] for r in records.values()]))
            finished = sum(r.status not in (QUEUED, RUNNING) for r in statuses)
            counts = {s: n for s in (QUEUED, RUNNING, FAILED) if (n := sum(r.status == s for r in statuses))}
            if counts != shown or finished != bar.n:  # redraw only on change: logs of a week stay readable
                bar.update(finished - bar.n)
                bar.set_postfix(counts)
                shown = counts
            if finished == len(statuses):
                return statuses
            time.sleep(poll_seconds)
    finally:
        bar.close()


def cancel(plan: StudyPlan, output: Path) -> list[JobResult]:
    """scancel every queued or running job of the study (as recorded in its folder); returns their statuses
    before cancelling."""
    records = load_records(output)
    statuses = job_statuses(plan, output, records, squeue_states([r["slurm_id"] for r in records.values()]))
    active = [r for r in statuses if r.status in (QUEUED, RUNNING)]
    ids = sorted({records[r.job.id]["slurm_id"] for r in active})
    if ids:
        subprocess.run(["scancel", *ids], check=True)
        log.info("cancelled %d Slurm job(s): %s", len(ids), " ".join(ids))
    return active


# -- nnssl_benchmark's entry -------------------------------------------------------------------------------
def run_slurm(plan: StudyPlan, output: Path, preprocessed: Path, cluster: ClusterSettings, device: str,
              action: str = "submit", wait: bool = False) -> tuple[str, list[JobResult]]:
    """``action``: ``submit`` (what is not done, queued or running), ``dry-run``, ``status`` or ``cancel``.
    Returns the text to print and each job's status (after waiting, with ``wait``)."""
    records = load_records(output)
    if action != "dry-run" or records:
        require_slurm()
    live = squeue_states([r["slurm_id"] for r in records.values()])
    statuses = job_statuses(plan, output, records, live)
    if action == "status":
        return format_status(statuses, output), statuses
    if action == "cancel":
        cancelled = cancel(plan, output)
        return f"cancelled {len(cancelled)} queued or running job(s) of the study in {output}", cancelled
    submissions, left_alone = plan_submissions(plan, statuses, records, cluster, device)
    if action == "dry-run":
        return format_submissions(submissions, cluster, left_alone, output), []
    submitted = submit(submissions, cluster, output, preprocessed, left_alone) if submissions else {}
    text = (f"submitted {len(submitted)} job(s) in {len(submissions)} sbatch call(s); {len(left_alone)} already "
            f"queued or running were left alone")
    if wait:
        statuses = wait_for(plan, output)
        return text + "\n" + format_status(statuses, output), statuses
    records = load_records(output)
    statuses = job_statuses(plan, output, records, squeue_states([r["slurm_id"] for r in records.values()]))
    return text + "\n" + format_status(statuses, output) + \
        "\nfollow it with: nnssl_benchmark --status (same options); stop it with --cancel", statuses


def format_status(statuses: Sequence[JobResult], output: Path) -> str:
    from nnssl.benchmark.executor import format_summary

    return format_summary(statuses, STATUSES) + f"\nrecords: {slurm_folder(output) / RECORDS}"
