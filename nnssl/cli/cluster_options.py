"""The Slurm options nnssl_benchmark and nnssl_demo share (``--executor slurm`` and the cluster settings)."""
from __future__ import annotations

import argparse

from nnssl.benchmark.cluster import ClusterSettings, load_cluster

# flag -> (ClusterSettings field, type, help)
_FLAGS = {
    "--partition": ("partition", str, "Slurm partition"),
    "--account": ("account", str, "Slurm account"),
    "--qos": ("qos", str, "Slurm QOS"),
    "--time": ("time", str, "time limit per job, Slurm format (default 1-00:00:00); longer jobs are requeued "
                            "and continue"),
    "--gpus-per-job": ("gpus_per_job", int, "GPUs of each fine-tuning and CKA job (default 1)"),
    "--cpus-per-job": ("cpus_per_job", int, "CPUs per task (default 8); threads and nnU-Net worker processes "
                                            "follow them"),
    "--mem": ("mem", str, "memory per node, e.g. 64G"),
    "--constraint": ("constraint", str, "Slurm node constraint, e.g. a100"),
    "--array-parallelism": ("array_parallelism", int, "array tasks running at once (default 64)"),
    "--pretrain-nodes": ("pretrain_nodes", int, "nodes per pretraining job (default 1)"),
    "--pretrain-gpus-per-node": ("pretrain_gpus_per_node", int, "GPUs per node of a pretraining job, one process "
                                                                "each (default: --gpus-per-job)"),
    "--pretrain-tasks-per-node": ("pretrain_tasks_per_node", int, "pretraining processes per node (default: one "
                                                                  "per GPU; gloo on the CPU)"),
    "--pretrain-time": ("pretrain_time", str, "time limit of pretraining jobs (default: --time)"),
    "--signal-delay": ("signal_delay_s", int, "seconds before the time limit at which Slurm signals a job to "
                                              "checkpoint and requeue (default 180)"),
}


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "Slurm (--executor slurm)", "Settings come from the 'cluster' section of --cluster FILE (or of --plan), "
                                    "then these flags.")
    group.add_argument("--executor", choices=("local", "slurm"), default="local",
                       help="local: run jobs on this machine (default); slurm: submit them with sbatch (submitit), "
                            "dependencies as afterok, fine-tunings as job arrays")
    group.add_argument("--cluster", metavar="FILE", help="JSON file with a 'cluster' section")
    for flag, (_, kind, text) in _FLAGS.items():
        group.add_argument(flag, type=kind, help=text)
    group.add_argument("--sbatch", action="append", metavar="OPTION",
                       help="another sbatch option for every job, e.g. --sbatch=--mail-type=FAIL (repeatable)")
    group.add_argument("--wait", action="store_true", help="with --executor slurm: wait until every job ended and "
                                                           "print the summary")


def cluster_from_args(args: argparse.Namespace, plan: str | None = None) -> ClusterSettings:
    overrides = {field: getattr(args, flag[2:].replace("-", "_")) for flag, (field, _, _) in _FLAGS.items()}
    overrides["sbatch"] = args.sbatch
    return load_cluster(args.cluster or plan, overrides)

