"""The resolved settings of a pretraining run: defaults here, then ``plans/pretrain/<method>.json``, then the
command line, then ``--plans-override key=value``. The run folder's ``config.json`` records the result."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from nnssl.errors import NnsslError
from nnssl.io import load_json
from nnssl.plans import load_plan, plans_dir


@dataclass
class PretrainConfig:
    """Loop settings shared by every method. ``lr`` is the base learning rate for a global batch of ``lr_batch``;
    the loop scales it linearly to the run's global batch (GPUs x ``batch_size`` x ``accumulate``), as the
    references do (DINO: base_lr x batch / 256). ``lr_batch`` None: ``lr`` is absolute. The per-method plans
    give the papers' values."""

    method: str
    datasets: list[str]
    configuration: str = "3d_fullres"
    plans: str = "nnUNetPlans"
    backbone: str = "paper"
    patch_size: list[int] | None = None  # default: the backbone preset's input_size
    run: str | None = None  # default: "<backbone>_<dataset ids>"
    epochs: int = 100
    steps_per_epoch: int | None = None  # default: one pass over the corpus per epoch (volumes / global batch)
    batch_size: int = 4
    accumulate: int = 1
    lr: float = 1e-4
    lr_batch: int | None = None  # the global batch that lr is stated for (linear scaling); None: lr is absolute
    min_lr: float = 1e-6
    warmup_epochs: float = 10.0
    weight_decay: float = 0.05
    weight_decay_end: float | None = None  # cosine schedule to this value (DINO: 0.04 -> 0.4); None = constant
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float | None = 3.0
    drop_path_rate: float = 0.1
    amp: str = "auto"  # auto: bf16 (or fp16 + GradScaler) on CUDA, off on CPU; or bf16, fp16, off
    compile: bool = False
    grad_checkpointing: bool = False  # recompute the Swin blocks in the backward: less memory, more compute
    channels_last: bool = False
    num_workers: int = 4
    device: str = "cuda"
    seed: int = 0
    checkpoint_every: int = 500  # steps between checkpoint_latest.pth writes
    log_every: int = 1
    nonfinite: str = "stop"  # stop: save nothing, exit with an error; skip: drop the step (at most max_skipped)
    max_skipped: int = 20
    logger: str = "csv"  # csv: log.csv only; tensorboard: event files beside it as well (nnssl.pretrain.tracking)
    plan_file: str | None = None  # the plan given with --plan; None: the installed plans/pretrain/<method>.json
    probe: str | None = None  # nnU-Net task to probe the encoder on during the run (nnssl.probe.during_pretraining)
    probe_every: int | None = None  # steps between probes; None: as often as 10% of the training time allows
    method_params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def scaled_lr(self, world_size: int) -> float:
        """The peak learning rate of a run on ``world_size`` processes: ``lr x global batch / lr_batch``."""
        if self.lr_batch is None:
            return self.lr
        return self.lr * world_size * self.batch_size * self.accumulate / self.lr_batch


FIELD_NAMES = [f.name for f in fields(PretrainConfig)]
_CHOICES = {"amp": ("auto", "bf16", "fp16", "off"), "nonfinite": ("stop", "skip"), "device": ("cuda", "cpu"),
            "logger": ("csv", "tensorboard")}
DEFAULT, FLAG, OVERRIDE = "default", "command line", "--plans-override"  # where a setting came from


def _coerce(key: str, value: Any, example: Any) -> Any:
    """Command-line strings -> the type of the default (JSON syntax for lists, bools and numbers)."""
    if not isinstance(value, str) or isinstance(example, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        if example is None or isinstance(example, str):
            return value
        raise NnsslError(f"--plans-override {key}={value}: cannot read '{value}' as a value "
                         f"like {json.dumps(example)}.") from None


def resolve_config(method: str, datasets: list[str], cli: dict[str, Any],
                   overrides: list[str] | None = None, plan_file: str | os.PathLike | None = None) -> PretrainConfig:
    """Merge defaults <- the method's plan <- ``cli`` (None values ignored) <- ``overrides``.

    The plan is ``plans/pretrain/<method>.json``, or ``plan_file`` (``--plan``), whose path the config then
    records. ``overrides`` are ``key=value`` strings; ``method.<name>=value`` sets a method hyperparameter.
    Unknown keys are errors that list the valid ones.
    """
    return resolve_config_with_sources(method, datasets, cli, overrides, plan_file)[0]


def resolve_config_with_sources(method: str, datasets: list[str], cli: dict[str, Any],
                                overrides: list[str] | None = None, plan_file: str | os.PathLike | None = None,
                                ) -> tuple[PretrainConfig, dict[str, str]]:
    """:func:`resolve_config`, and where each setting came from (``--print-config``): setting name (method
    hyperparameters as ``method.<name>``) -> "default", "plan <file>", "command line" or "--plans-override"."""
    from nnssl.methods.registry import method_defaults  # imports torch: not needed for --help

    plan_path, plan = _load_method_plan(method, plan_file)
    from_plan = f"plan {plan_path}"
    # description and finetune_encoder (nnssl.plans.finetune_encoder) describe the run; they are not loop settings
    values: dict[str, Any] = {k: v for k, v in plan.items()
                              if not k.startswith("_") and k not in ("description", "finetune_encoder")}
    values["method_params"] = values.pop("method", {})
    sources = {k: from_plan for k in values if k != "method_params"}
    sources.update({f"method.{k}": from_plan for k in values["method_params"]})
    given = {k: v for k, v in cli.items() if v is not None}
    values.update(given)
    sources.update({k: FLAG for k in given})
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise NnsslError(f"--plans-override expects key=value, got '{item}'.")
        if key.startswith("method."):
            name = key[len("method."):]
            valid = method_defaults(method)
            if name not in valid:
                raise NnsslError(f"--plans-override {item}: method '{method}' has no hyperparameter '{name}'. "
                                 f"Valid: {sorted(valid)}.")
            values["method_params"][name] = _coerce(key, raw, valid[name])
        else:
            if key not in FIELD_NAMES or key in ("method", "datasets"):
                raise NnsslError(f"--plans-override {item}: unknown setting '{key}'. Valid: "
                                 f"{sorted(set(FIELD_NAMES) - {'method', 'datasets', 'method_params'})} "
                                 f"or method.<hyperparameter>.")
            values[key] = _coerce(key, raw, getattr(PretrainConfig(method, datasets), key))
        sources[key] = OVERRIDE
    unknown = sorted(set(values) - set(FIELD_NAMES))
    if unknown:
        raise NnsslError(f"{plan_path}: unknown setting(s) {unknown}. Valid: {sorted(FIELD_NAMES)} "
                         f"(method hyperparameters go under \"method\").")
    valid_params = method_defaults(method)
    bad_params = sorted(set(values["method_params"]) - set(valid_params))
    if bad_params:
        raise NnsslError(f"{plan_path}: method '{method}' has no hyperparameter(s) {bad_params}. "
                         f"Valid: {sorted(valid_params)}.")
    values.pop("method", None)
    values.pop("datasets", None)
    if plan_file is not None:
        values["plan_file"] = str(plan_path)
        sources["plan_file"] = FLAG
    config = PretrainConfig(method=method, datasets=[str(d) for d in datasets], **values)
    _validate(config)
    sources.update({k: FLAG for k in ("method", "datasets")})
    sources.update({k: DEFAULT for k in FIELD_NAMES if k not in sources and k != "method_params"})
    sources.update({f"method.{k}": DEFAULT for k in valid_params if f"method.{k}" not in sources})
    return config, sources


def _load_method_plan(method: str, plan_file: str | os.PathLike | None) -> tuple[Path, dict[str, Any]]:
    """The plan file and its settings: ``plan_file`` if given, else the installed one (``{}`` if it has none)."""
    if plan_file is None:
        path = plans_dir() / "pretrain" / f"{method}.json"
        return path, (load_plan(f"pretrain/{method}.json") if path.is_file() else {})
    path = Path(plan_file).resolve()
    if not path.is_file():
        raise NnsslError(f"--plan {plan_file} does not exist. Start from the installed plan: "
                         f"cp {plans_dir() / 'pretrain' / f'{method}.json'} {plan_file}")
    plan = load_json(path, fix=f"fix the edit, or copy {plans_dir() / 'pretrain' / f'{method}.json'} again.")
    if not isinstance(plan, dict):
        raise NnsslError(f"--plan {plan_file} must hold a JSON object of settings, like "
                         f"{plans_dir() / 'pretrain' / f'{method}.json'}.")
    return path, plan


def _validate(config: PretrainConfig) -> None:
    for key, choices in _CHOICES.items():
        if getattr(config, key) not in choices:
            raise NnsslError(f"Setting {key}={getattr(config, key)!r} is not one of {list(choices)}.")
    positive = ["epochs", "batch_size", "accumulate", "checkpoint_every", "log_every"]
    for key in positive:
        if not isinstance(getattr(config, key), int) or getattr(config, key) < 1:
            raise NnsslError(f"Setting {key}={getattr(config, key)!r} must be a whole number >= 1.")
    if config.steps_per_epoch is not None and config.steps_per_epoch < 1:
        raise NnsslError(f"--steps-per-epoch must be >= 1, got {config.steps_per_epoch}.")
    if config.probe_every is not None and (not isinstance(config.probe_every, int) or config.probe_every < 1):
        raise NnsslError(f"--probe-every must be a whole number >= 1, got {config.probe_every!r}.")
    if config.probe_every is not None and config.probe is None:
        raise NnsslError("--probe-every needs --probe TASK (the nnU-Net task to probe on).")
    if config.lr <= 0:
        raise NnsslError(f"--lr must be > 0, got {config.lr}.")
    if config.lr_batch is not None and (not isinstance(config.lr_batch, int) or config.lr_batch < 1):
        raise NnsslError(f"Setting lr_batch={config.lr_batch!r} (the global batch that lr is stated for) must be a "
                         f"whole number >= 1, or null for an absolute lr.")
    if config.num_workers < 0:
        raise NnsslError(f"--num-workers must be >= 0, got {config.num_workers}.")
    if config.patch_size is not None and (len(config.patch_size) != 3 or any(s % 32 for s in config.patch_size)):
        raise NnsslError(f"patch_size {config.patch_size} must be three sides, each a multiple of 32 (Swin).")
