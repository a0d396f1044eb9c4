"""What runs inside a Slurm job that ``nnssl_benchmark --executor slurm`` submitted (through submitit).

:class:`SlurmCommand` is pickled by submitit and called on the node: it runs one study job's command as a
child process with the job's share of the allocation (:mod:`nnssl.benchmark.allocation`), the
torch.distributed variables of a multi-task job (``MASTER_ADDR``, ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``
from Slurm's, through submitit's ``TorchDistributedEnvironment``), appends the output to the same
``<output>/logs/<job>.log`` the local executor writes, and records its outcome for ``--status``.

Time limits and preemption: Slurm sends submitit's signal (``USR2``, ``signal_delay_s`` before the end or at
preemption) to the job; submitit calls :meth:`SlurmCommand.checkpoint` on task 0, which sends ``SIGTERM`` to
its child (``nnssl_pretrain`` saves a checkpoint at the end of the step, the other ranks agree to stop at
the same step; ``nnUNetv2_train`` stops and keeps its last ``checkpoint_latest.pth``) and waits for it, and
submitit requeues the job. The child never sees submitit's signal itself (it is ignored in the child), and
every command runs with its continue flag (:func:`nnssl.benchmark.job.resumable`), so the requeued job goes
on from the last checkpoint.
"""
from __future__ import annotations

import datetime
import logging
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from nnssl.benchmark.allocation import slurm_share
from nnssl.benchmark.executor import job_environment, log_header, log_path
from nnssl.benchmark.job import Job, resumable
from nnssl.io import save_json

log = logging.getLogger(__name__)

CHILD_GRACE_SECONDS = 100  # how long a signalled command may take to save; keep below the signal delay


class JobFailed(RuntimeError):
    """The command exited non-zero or its output failed the check; the Slurm job fails (its dependents are
    cancelled by Slurm: ``--kill-on-invalid-dep=yes``)."""


def outcome_path(outcome_dir: Path, job_id: str) -> Path:
    return outcome_dir / f"{job_id.replace('/', '__')}.json"


def slurm_job_id() -> str:
    """``123`` for a job, ``123_4`` for task 4 of array 123 (as squeue and afterok name them)."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array:
        return f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID", "?")


def _ignoring_preemption_signal():
    """A ``preexec_fn`` for the child: submitit's signal is the wrapper's business (an ignored signal stays
    ignored across exec; nnssl_pretrain and nnUNetv2_train never install a handler for it)."""
    from submitit.core.job_environment import JobEnvironment

    number = JobEnvironment._usr_sig()
    return lambda: signal.signal(number, signal.SIG_IGN)


def distributed_env() -> dict[str, str]:
    """torch.distributed's ``env://`` variables when the job has several tasks (nodes x tasks per node)."""
    if int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return {}
    from submitit.helpers import TorchDistributedEnvironment

    dist = TorchDistributedEnvironment()
    return {"MASTER_ADDR": dist.master_addr, "MASTER_PORT": str(dist.master_port), "RANK": str(dist.rank),
            "WORLD_SIZE": str(dist.world_size), "LOCAL_RANK": str(dist.local_rank),
            "LOCAL_WORLD_SIZE": str(dist.local_world_size)}


class SlurmCommand:
    """One study job as a submitit callable: ``__call__`` runs it, ``checkpoint`` stops it for a requeue."""

    def __init__(self, job: Job, log_dir: Path, outcome_dir: Path, preprocessed: Path | None = None):
        self.job = resumable(job)
        self.log_dir = log_dir
        self.outcome_dir = outcome_dir
        self.preprocessed = preprocessed  # for the few-shot check (nnssl.benchmark.driver.check_fewshot)
        self._process: subprocess.Popen | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_process": None}  # a running child is not pickled into the requeued job

    def __call__(self) -> int:
        ddp = distributed_env()
        rank = int(ddp.get("RANK", "0"))
        env = {**job_environment(self.job, {}, slurm_share()), **ddp}
        path = log_path(self.log_dir, self.job)
        path = path if rank == 0 else path.with_suffix(f".rank{rank}.log")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        where = f" (Slurm job {slurm_job_id()} on {socket.gethostname()}" + \
                (f", rank {rank} of {ddp['WORLD_SIZE']}, MASTER_ADDR={ddp['MASTER_ADDR']}:{ddp['MASTER_PORT']}"
                 if ddp else "") + ")"
        started = time.monotonic()
        with open(path, "a") as handle:
            handle.write(log_header(self.job, env, where))
            handle.flush()
            self._process = subprocess.Popen(self.job.command, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, preexec_fn=_ignoring_preemption_signal())
            code = self._process.wait()
            message = f"exit status {code}" if code else self._check()
            if message:
                handle.write(f"nnssl_benchmark: {message}\n")
        if rank == 0:
            save_json({"slurm_id": slurm_job_id(), "status": "failed" if message else "ok", "returncode": code,
                       "message": message or "", "seconds": round(time.monotonic() - started, 1),
                       "finished": datetime.datetime.now().isoformat(timespec="seconds"), "log": str(path)},
                      outcome_path(self.outcome_dir, self.job.id))
        if message:
            raise JobFailed(f"{self.job.id}: {message}; log: {path}")
        return code

    def _check(self) -> str | None:
        if self.preprocessed is None:
            return None
        from nnssl.benchmark.driver import check_fewshot

        return check_fewshot(self.job, self.preprocessed)

    def checkpoint(self):
        """Called by submitit on task 0 when Slurm signals the time limit or preemption: stop the command so it
        saves, then requeue this same command (it continues: ``--resume`` / ``--c``)."""
        from submitit.helpers import DelayedSubmission

        if self._process is not None:
            log.warning("nnssl_benchmark: %s signalled by Slurm; stopping the command so it checkpoints", self.job.id)
            _stop(self._process.pid)
        return DelayedSubmission(SlurmCommand(self.job, self.log_dir, self.outcome_dir, self.preprocessed))


def _stop(pid: int) -> None:
    """SIGTERM, wait up to the grace, then SIGKILL. With os.waitpid, not Popen.wait: this runs in a signal
    handler that interrupted ``Popen.wait`` in ``__call__``, which holds the lock Popen's own waiting needs."""
    try:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + CHILD_GRACE_SECONDS
        while time.monotonic() < deadline:
            if os.waitpid(pid, os.WNOHANG)[0]:
                return
            time.sleep(0.2)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ChildProcessError, ProcessLookupError):  # it had ended already
        return
