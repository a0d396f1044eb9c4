"""Jobs that fit their allocation: worker processes and threads from a job's share of the node's cores.

nnU-Net starts 12 augmentation and 8 export processes per training by default (``nnUNet_n_proc_DA``,
``nnUNet_def_n_proc``) and PyTorch one thread per core (``OMP_NUM_THREADS``); several jobs side by side on one
node multiply that until the OOM killer steps in. Every job the driver launches gets the three variables
from its share of the cores instead: ``SLURM_CPUS_PER_TASK`` inside a Slurm job, cores / parallel jobs on the
local executor. A job's own environment (the plan's ``finetune_env``) wins over the share.
"""
from __future__ import annotations

import os

from nnssl.benchmark.jobs import Job

SHARE_VARIABLES = ("OMP_NUM_THREADS", "nnUNet_n_proc_DA", "nnUNet_def_n_proc")


def local_share(parallel_jobs: int) -> int:
    """Cores per job when ``parallel_jobs`` jobs share this machine (at least one)."""
    return max(1, len(os.sched_getaffinity(0)) // max(1, parallel_jobs))


def slurm_share() -> int:
    """Cores of the running Slurm task: ``SLURM_CPUS_PER_TASK``, else the node's cores given to the job."""
    for name in ("SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE"):
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return len(os.sched_getaffinity(0))


def share_env(job: Job, cores: int) -> dict[str, str]:
    """The three variables for ``job`` running on ``cores`` cores.

    Training: one core drives the network, the others augment (none left: nnU-Net augments in the main
    process). nnU-Net 2.8.1's planner passes ``nnUNet_n_proc_DA`` to ``torch.set_num_threads``, which rejects
    0, so other jobs get at least one.
    """
    augmenters = cores - 1 if job.kind == "finetune" else max(1, cores - 1)
    return {"OMP_NUM_THREADS": str(cores), "nnUNet_n_proc_DA": str(augmenters), "nnUNet_def_n_proc": str(cores)}


def describe_share(env: dict[str, str]) -> str:
    """The variables as they go into a job's log."""
    return " ".join(f"{name}={env[name]}" for name in SHARE_VARIABLES if name in env)
