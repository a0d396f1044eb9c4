"""Cluster settings of ``nnssl_benchmark --executor slurm``: flags and/or a ``cluster`` section of a JSON file
(the benchmark plan itself, or a file of its own), turned into the sbatch options of each kind of job.

A ``cluster`` section (every key optional; flags of the same name win)::

    "cluster": {"partition": "gpu", "account": "lab", "qos": "normal", "time": "2-00:00:00",
                "gpus_per_job": 1, "cpus_per_job": 8, "mem": "64G", "constraint": "a100",
                "sbatch": ["--mail-type=FAIL"], "array_parallelism": 64,
                "pretrain_nodes": 2, "pretrain_gpus_per_node": 8, "pretrain_time": "3-00:00:00",
                "signal_delay_s": 180, "max_requeues": 10}

Pretraining jobs get ``pretrain_nodes`` x ``pretrain_gpus_per_node`` GPUs as that many Slurm tasks (one
process per GPU, ``--ntasks-per-node`` = GPUs per node, or ``pretrain_tasks_per_node`` processes); every
other job one task with ``gpus_per_job`` GPUs (none for CPU jobs: planning, few-shot folds, the report; none
at all with ``--device cpu``).
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from nnssl.benchmark.jobs import Job
from nnssl.errors import NnsslError
from nnssl.io import load_json

_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")  # Slurm's [D-]H[:M[:S]] / M forms


@dataclass(frozen=True)
class ClusterSettings:
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str = "1-00:00:00"  # per job; fine-tunings longer than that are requeued and continue (--c)
    gpus_per_job: int = 1
    cpus_per_job: int = 8
    mem: str | None = None  # sbatch --mem, e.g. "64G"
    constraint: str | None = None
    sbatch: tuple[str, ...] = ()  # further sbatch options, e.g. "--mail-type=FAIL"
    array_parallelism: int = 64  # array tasks running at once
    pretrain_nodes: int = 1
    pretrain_gpus_per_node: int | None = None  # default: gpus_per_job
    pretrain_tasks_per_node: int | None = None  # processes per node; default: one per GPU (on the CPU: one)
    pretrain_time: str | None = None  # default: time
    signal_delay_s: int = 180  # Slurm signals this long before the time limit: enough to save a checkpoint
    max_requeues: int = 10  # requeues after reaching the time limit (preemptions are not counted)
    extra: dict[str, str] = field(default_factory=dict, compare=False)  # parsed from ``sbatch``

    def __post_init__(self) -> None:
        for name in ("gpus_per_job", "cpus_per_job", "array_parallelism", "pretrain_nodes", "pretrain_gpus_per_node",
                     "pretrain_tasks_per_node", "signal_delay_s", "max_requeues"):
            value, least = getattr(self, name), 0 if name in ("gpus_per_job", "pretrain_gpus_per_node",
                                                                "max_requeues") else 1
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < least):
                raise NnsslError(f"Cluster setting {name}={value!r} must be a whole number >= {least}.")
        for name in ("time", "pretrain_time"):
            if getattr(self, name) is not None:
                minutes(getattr(self, name), name)
        object.__setattr__(self, "extra", dict(_sbatch_option(o) for o in self.sbatch))


def minutes(value: str | int, name: str = "time") -> int:
    """Slurm's time formats (``90``, ``2:00:00``, ``1-12:00:00``) in whole minutes (at least one)."""
    text = str(value).strip()
    match = _TIME.match(text)
    if not match:
        raise NnsslError(f"Cluster setting {name}={value!r} is not a Slurm time: write minutes (90), H:M:S "
                         f"(2:00:00) or D-H:M:S (1-12:00:00).")
    days, *parts = match.groups()
    numbers = [int(p) for p in parts if p is not None]
    if days is not None:  # D-H, D-H:M, D-H:M:S
        hours, mins, secs = (numbers + [0, 0])[:3]
        hours += int(days) * 24
    else:  # M, M:S, H:M:S
        hours, mins, secs = ([0, 0] + numbers)[-3:] if len(numbers) == 3 else (0, *(numbers + [0])[:2])
    total = hours * 60 + mins + (secs + 59) // 60
    return max(1, total)


def _sbatch_option(option: str) -> tuple[str, str]:
    if not option.startswith("--") or len(option) < 3:
        raise NnsslError(f"Cluster setting sbatch: {option!r} is not an sbatch long option; write e.g. "
                         f"--mail-type=FAIL or --exclusive.")
    key, _, value = option[2:].partition("=")
    return key, value


def load_cluster(path: str | Path | None, overrides: dict[str, Any]) -> ClusterSettings:
    """The ``cluster`` section of ``path`` (if given and present), then every override that is not None."""
    values: dict[str, Any] = {}
    if path is not None:
        if not Path(path).is_file():
            raise NnsslError(f"{path} does not exist: --cluster (or --plan) names a JSON file with a \"cluster\" "
                             f"section, e.g. {{\"cluster\": {{\"partition\": \"gpu\", \"time\": \"1-00:00:00\"}}}}.")
        data = load_json(path, fix="fix the JSON syntax (python -m json.tool FILE shows where it breaks).")
        section = data.get("cluster", {}) if isinstance(data, dict) else None
        if not isinstance(section, dict):
            raise NnsslError(f"{path}: 'cluster' must be an object of settings such as "
                             f'{{"partition": "gpu", "time": "1-00:00:00"}}.')
        values.update({k: v for k, v in section.items() if not k.startswith("_")})
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in fields(ClusterSettings)} - {"extra"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise NnsslError(f"Unknown cluster setting(s) {unknown}{f' in {path}' if path else ''}; known: "
                         f"{sorted(known)}.")
    if "sbatch" in values:
        values["sbatch"] = tuple(values["sbatch"])
    for name in ("time", "pretrain_time"):
        if isinstance(values.get(name), int):
            values[name] = str(values[name])
    return ClusterSettings(**values)


def to_dict(cluster: ClusterSettings) -> dict[str, Any]:
    return {k: v for k, v in asdict(cluster).items() if k != "extra"}


def sbatch_options(cluster: ClusterSettings, job: Job, device: str, job_name: str,
                   dependency: str | None) -> dict[str, str]:
    """The sbatch options (without ``--array``, ``--signal`` and the output files, which submitit adds) of a
    submission of jobs like ``job``."""
    gpus = cluster.gpus_per_job if device == "cuda" and job.gpu else 0
    nodes, tasks, time = 1, 1, cluster.time
    if job.kind == "pretrain":
        per_node = cluster.pretrain_gpus_per_node if cluster.pretrain_gpus_per_node is not None else \
            cluster.gpus_per_job
        gpus = per_node if device == "cuda" else 0
        nodes, time = cluster.pretrain_nodes, cluster.pretrain_time or cluster.time
        tasks = cluster.pretrain_tasks_per_node or max(1, gpus)
    options = {"job-name": job_name, "time": str(minutes(time)), "nodes": str(nodes), "ntasks-per-node": str(tasks),
               "cpus-per-task": str(cluster.cpus_per_job)}
    if gpus:
        options["gpus-per-node"] = str(gpus)
    for name in ("partition", "account", "qos", "mem", "constraint"):
        if getattr(cluster, name):
            options[name] = str(getattr(cluster, name))
    if dependency:
        options["dependency"] = dependency
    # a job whose dependency failed is cancelled instead of pending for ever; requeue works on any cluster
    options.update({"kill-on-invalid-dep": "yes", "requeue": ""})
    options.update(cluster.extra)
    return options

