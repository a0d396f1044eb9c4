"""The study as data: ``plans/benchmark.json`` read into typed, validated objects.

Everything benchmark-specific (tasks, dataset ids, labels, few-shot sizes, methods, trainers, folds, seeds,
corpus) lives in that file; code reads it through :func:`load_study` and never repeats its contents.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nnssl.align_plans import CORPUS_PLANS
from nnssl.benchmark.budget import PretrainingProtocol, parse_protocol
from nnssl.errors import NnsslError
from nnssl.plans import did_you_mean, load_plan, plans_dir
from nnssl.plans_variants import variant_identifier

DEFAULT_PLAN = "benchmark.json"
MODALITIES = ("CT", "MRI")
IMPORTED_TRAINER = "SwinUNETR_Imported_Trainer"  # fine-tunes encoders the study does not pretrain


@dataclass(frozen=True)
class TaskSpec:
    """One fine-tuning task: where its public data comes from and what nnU-Net dataset it becomes."""

    key: str  # the name used on the command line, e.g. "AMOS-CT"
    dataset_id: int
    dataset_name: str
    modality: str  # "CT" or "MRI": written to dataset.json as "imaging_modality"
    converter: str
    channel_names: dict[str, str]
    labels: dict[str, int]
    few_shot: tuple[int, ...]
    expected_cases: int | None
    description: str
    source: dict[str, str]
    options: dict[str, Any] = field(default_factory=dict)  # converter-specific keys of the task entry
    align: dict[str, Any] = field(default_factory=dict)  # nnssl_align_plans overrides, e.g. {"spacing": [z, y, x]}

    @property
    def dataset(self) -> str:
        """nnU-Net's folder name, e.g. ``Dataset003_Liver``."""
        return f"Dataset{self.dataset_id:03d}_{self.dataset_name}"


@dataclass(frozen=True)
class MethodSpec:
    name: str  # nnssl_pretrain -m name ("scratch" has no pretraining)
    trainer: str
    pretrained: bool
    # an imported encoder (public weights converted by nnssl_import): not pretrained by the study, fine-tuned by
    # SwinUNETR_Imported_Trainer in its own plans variant <plans>_<name> (nnssl.plans_variants)
    encoder_file: Path | None = None

    @property
    def pretrains(self) -> bool:
        """Whether the study runs nnssl_pretrain for this method."""
        return self.pretrained and self.encoder_file is None


@dataclass(frozen=True)
class BaselineSpec:
    """An extra nnU-Net trainer run on the same folds as the SSL methods, as a reference (not ranked)."""

    name: str  # its row name in the report, e.g. "nnUNet"
    trainer: str  # e.g. "nnUNetTrainer"
    configuration: str
    plans_identifier: str
    finetune_env: dict[str, str] = field(default_factory=dict)  # over the study's, e.g. a CNN's own schedule

    @property
    def folder_name(self) -> str:
        """nnU-Net's model folder name ``<trainer>__<plans>__<configuration>``."""
        return f"{self.trainer}__{self.plans_identifier}__{self.configuration}"


@dataclass(frozen=True)
class Study:
    tasks: dict[str, TaskSpec]
    methods: dict[str, MethodSpec]
    folds: tuple[int, ...]
    seeds: tuple[int, ...]
    backbone: str
    configuration: str
    plans_identifier: str
    corpus_id: int
    corpus_name: str
    corpus_run: str
    cka_base_folds: tuple[int, ...]
    source: Path
    pretrain_args: tuple[str, ...] = ()  # extra nnssl_pretrain options (e.g. --epochs 2 for a toy study)
    finetune_env: dict[str, str] = field(default_factory=dict)  # e.g. {"nnssl_num_epochs": "5"}
    num_processes: int | None = None  # worker processes of corpus preparation and nnU-Net planning (None: theirs)
    cka_args: tuple[str, ...] = ()  # extra nnssl_cka options (e.g. --patches-per-case 32)
    baselines: dict[str, BaselineSpec] = field(default_factory=dict)  # reference nnU-Net trainers
    probe_task: str | None = None  # key of the task nnssl_probe judges every encoder on before fine-tuning
    probe_args: tuple[str, ...] = ()  # extra nnssl_probe options
    pretraining: PretrainingProtocol = PretrainingProtocol("reference")  # the budget every method gets

    @property
    def aligned(self) -> bool:
        """Fine-tuning plans made by nnssl_align_plans (any identifier but nnU-Net's own)."""
        return self.plans_identifier != CORPUS_PLANS

    @property
    def corpus_dataset(self) -> str:
        return f"Dataset{self.corpus_id:03d}_{self.corpus_name}"

    def task(self, name: str | int) -> TaskSpec:
        """A task by its key (any case), dataset id (``3``, ``"003"``), folder name or MSD folder name."""
        text = str(name).strip()
        by_key = {key.lower(): task for key, task in self.tasks.items()}
        if text.lower() in by_key:
            return by_key[text.lower()]
        for task in self.tasks.values():
            aliases = {task.dataset, task.dataset_name, f"Task{task.dataset_id:02d}_{task.dataset_name}"}
            if text.lower() in {a.lower() for a in aliases} or (text.isdigit() and int(text) == task.dataset_id):
                return task
        raise NnsslError(f"Unknown task '{text}'. Tasks of the study ({self.source}): {', '.join(self.tasks)}."
                         f"{did_you_mean(text, list(self.tasks))}")

    def method(self, name: str) -> MethodSpec:
        if name not in self.methods:
            raise NnsslError(f"Unknown method '{name}'. Methods of the study ({self.source}): "
                             f"{', '.join(self.methods)}.{did_you_mean(name, list(self.methods))}")
        return self.methods[name]


def parse_baselines(entries: dict[str, Any], configuration: str, plans: str) -> dict[str, BaselineSpec]:
    """The ``baselines`` section: name -> {"trainer", "configuration", "plans_identifier", "finetune_env"} (the
    configuration and plans default to the study's, so a baseline trains on the same preprocessed data;
    ``finetune_env`` entries replace the study's for this trainer)."""
    return {name: BaselineSpec(name, entry["trainer"], entry.get("configuration", configuration),
                               entry.get("plans_identifier", plans),
                               {str(k): str(v) for k, v in entry.get("finetune_env", {}).items()})
            for name, entry in entries.items() if not name.startswith("_")}


_TASK_KEYS = {"dataset_id", "dataset_name", "modality", "converter", "channel_names", "labels", "few_shot",
              "expected_cases", "description", "source", "align"}


def load_study(plan: str | Path | None = None) -> Study:
    """Read and check a benchmark plan: ``plans/benchmark.json`` by default, or the JSON file ``plan``."""
    # an absolute path replaces plans_dir() in load_plan's join, so a custom plan is read by the same code
    source = Path(DEFAULT_PLAN) if plan is None else Path(plan).resolve()
    data = load_plan(str(source))
    try:
        return _parse(data, source)
    except (KeyError, TypeError, ValueError) as err:
        raise NnsslError(f"Benchmark plan {source} is malformed ({type(err).__name__}: {err}). "
                         f"Compare it with plans/{DEFAULT_PLAN}.") from None


def _parse(data: dict[str, Any], source: Path) -> Study:
    tasks = {key: _parse_task(key, entry, source) for key, entry in data["tasks"].items()}
    ids = [t.dataset_id for t in tasks.values()] + [int(data["corpus"]["dataset_id"])]
    duplicated = sorted({i for i in ids if ids.count(i) > 1})
    if duplicated:
        raise NnsslError(f"{source}: dataset id(s) {duplicated} are used twice; every task and the corpus "
                         f"need their own nnU-Net id.")
    methods = {name: _parse_method(name, entry, source) for name, entry in data["methods"].items()}
    clash = sorted(set(methods) & set(data.get("baselines", {})))
    if clash:
        raise NnsslError(f"{source}: {clash} named both as method and as baseline; give the baseline another name.")
    return Study(
        tasks=tasks, methods=methods, folds=tuple(int(f) for f in data["folds"]),
        seeds=tuple(int(s) for s in data["seeds"]), backbone=data["backbone"],
        configuration=data["configuration"], plans_identifier=data["plans_identifier"],
        corpus_id=int(data["corpus"]["dataset_id"]), corpus_name=data["corpus"]["name"],
        corpus_run=data["corpus"]["run"], cka_base_folds=tuple(int(f) for f in data["cka"]["base_folds"]),
        source=source, pretrain_args=tuple(str(a) for a in data.get("pretrain_args", [])),
        finetune_env={str(k): str(v) for k, v in data.get("finetune_env", {}).items()},
        num_processes=int(data["num_processes"]) if data.get("num_processes") is not None else None,
        cka_args=tuple(str(a) for a in data["cka"].get("args", [])),
        baselines=parse_baselines(data.get("baselines", {}), data["configuration"], data["plans_identifier"]),
        probe_task=_probe_task(data.get("probe"), tasks, source),
        probe_args=tuple(str(a) for a in (data.get("probe") or {}).get("args", [])),
        pretraining=parse_protocol(data.get("pretraining"), str(source)),
    )


def _parse_method(name: str, entry: dict[str, Any], source: Path) -> MethodSpec:
    if "encoder_file" not in entry:
        return MethodSpec(name, entry["trainer"], bool(entry.get("pretrained", True)))
    if entry["trainer"] != IMPORTED_TRAINER:
        raise NnsslError(f"{source}: method {name} names an encoder_file, which only {IMPORTED_TRAINER} reads; "
                         f"set \"trainer\": \"{IMPORTED_TRAINER}\".")
    variant_identifier("x", name)  # the method name becomes part of a plans identifier: check it now
    # relative to the plan file, so that a study folder with its encoders can move
    folder = source.parent if source.is_absolute() else plans_dir()
    path = folder / os.path.expanduser(os.path.expandvars(str(entry["encoder_file"])))
    return MethodSpec(name, IMPORTED_TRAINER, True, path.resolve())


def _probe_task(entry: dict[str, Any] | None, tasks: dict[str, TaskSpec], source: Path) -> str | None:
    """The key of ``"probe": {"task": ...}`` (optional), which must name one of the study's tasks."""
    if not entry:
        return None
    name = str(entry["task"])
    if name not in tasks:
        raise NnsslError(f"{source}: probe task '{name}' is not a task of the study ({', '.join(tasks)})."
                         f"{did_you_mean(name, list(tasks))}")
    return name


def _parse_task(key: str, entry: dict[str, Any], source: Path) -> TaskSpec:
    if entry["modality"] not in MODALITIES:
        raise NnsslError(f"{source}: task {key} has modality {entry['modality']!r}; use one of {list(MODALITIES)}.")
    labels = {name: int(value) for name, value in entry["labels"].items()}
    if sorted(labels.values()) != list(range(len(labels))) or labels.get("background") != 0:
        raise NnsslError(f"{source}: task {key} labels must be background=0 and consecutive integers "
                         f"(nnU-Net's rule); got {labels}.")
    few_shot = tuple(int(n) for n in entry["few_shot"])
    if any(n < 1 for n in few_shot):
        raise NnsslError(f"{source}: task {key} few_shot sizes must be >= 1; got {list(few_shot)}.")
    return TaskSpec(
        key=key, dataset_id=int(entry["dataset_id"]), dataset_name=entry["dataset_name"],
        modality=entry["modality"], converter=entry.get("converter", ""),  # none for data made by nnssl itself
        channel_names={str(k): v for k, v in entry["channel_names"].items()}, labels=labels, few_shot=few_shot,
        expected_cases=entry.get("expected_cases"), description=entry.get("description", ""),
        source=dict(entry.get("source", {})), align=dict(entry.get("align", {})),
        options={k: v for k, v in entry.items() if k not in _TASK_KEYS and not k.startswith("_")},
    )
