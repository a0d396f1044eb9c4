"""The study's pretraining protocol: one budget of optimizer steps, volumes per step and crop size for every method.

``plans/benchmark.json`` ``"pretraining"``::

    {"protocol": "shared", "steps": 50000, "global_batch": 8, "crop_size": [128, 128, 128], "epochs": null}

``shared``: every method runs ``steps`` optimizer steps of ``global_batch`` volumes (one GPU: the per-GPU batch)
on ``crop_size`` crops. Each method keeps its plan's loss hyperparameters and its number of epochs, so that
schedules defined in epochs (warmup, teacher temperature, EMA momentum) keep their shape: ``steps_per_epoch =
steps / epochs``. ``epochs`` set here replaces every method's (toy studies). The learning rate follows the global
batch by each method's own rule (``plans/pretrain/<method>.json``).
``reference``: each method's published recipe as in ``plans/pretrain/<method>.json``, budgets differing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nnssl.errors import NnsslError
from nnssl.plans import load_plan, plans_dir

SHARED, REFERENCE = "shared", "reference"
# nnssl_pretrain options the shared protocol sets; the study's pretrain_args must leave them alone
BUDGET_FLAGS = ("--epochs", "--steps-per-epoch", "--batch-size", "--patch-size")


@dataclass(frozen=True)
class PretrainingProtocol:
    protocol: str
    steps: int | None = None
    global_batch: int | None = None
    crop_size: tuple[int, int, int] | None = None
    epochs: int | None = None  # None: each method's own number of epochs


@dataclass(frozen=True)
class Budget:
    """One method's pretraining budget as the study runs it (None: decided by the corpus size at run time)."""

    method: str
    epochs: int
    steps_per_epoch: int | None
    batch: int
    crop_size: tuple[int, ...] | None

    @property
    def steps(self) -> int | None:
        return None if self.steps_per_epoch is None else self.epochs * self.steps_per_epoch

    @property
    def volumes(self) -> int | None:
        return None if self.steps is None else self.steps * self.batch

    def args(self) -> tuple[str, ...]:
        """The nnssl_pretrain options that give this budget."""
        args = ["--epochs", str(self.epochs), "--batch-size", str(self.batch)]
        args += ["--steps-per-epoch", str(self.steps_per_epoch)] if self.steps_per_epoch else []
        args += ["--patch-size", *map(str, self.crop_size)] if self.crop_size else []
        return tuple(args)

    def describe(self) -> str:
        crop = "x".join(map(str, self.crop_size)) if self.crop_size else "the backbone's input size"
        if self.steps is None:
            return (f"{self.method}: {self.epochs} epochs of one pass over the corpus, {self.batch} volumes per step, "
                    f"crop {crop}")
        return (f"{self.method}: {self.steps} optimizer steps x {self.batch} volumes = {self.volumes} volumes seen, "
                f"crop {crop} ({self.epochs} epochs x {self.steps_per_epoch} steps)")


def parse_protocol(entry: dict[str, Any] | None, source: str) -> PretrainingProtocol:
    """The ``pretraining`` section of a benchmark plan (absent: each method's reference recipe)."""
    if not entry:
        return PretrainingProtocol(REFERENCE)
    protocol = entry.get("protocol", SHARED)
    if protocol == REFERENCE:
        return PretrainingProtocol(REFERENCE)
    if protocol != SHARED:
        raise NnsslError(f"{source}: pretraining.protocol is {protocol!r}; use '{SHARED}' or '{REFERENCE}'.")
    values = {key: entry.get(key) for key in ("steps", "global_batch", "epochs")}
    for key, value in values.items():
        if (value is not None or key != "epochs") and not (isinstance(value, int) and value >= 1):
            raise NnsslError(f"{source}: pretraining.{key} must be a whole number >= 1; got {value!r}.")
    crop = entry.get("crop_size")
    if not (isinstance(crop, list) and len(crop) == 3 and all(isinstance(s, int) and s % 32 == 0 and s > 0
                                                               for s in crop)):
        raise NnsslError(f"{source}: pretraining.crop_size must be three multiples of 32, e.g. [128, 128, 128]; "
                         f"got {crop!r}.")
    return PretrainingProtocol(SHARED, values["steps"], values["global_batch"], tuple(crop), values["epochs"])


def method_budget(protocol: PretrainingProtocol, method: str, pretrain_args: tuple[str, ...] = ()) -> Budget:
    """What ``method`` gets under ``protocol``; an error when the shared steps do not divide into its epochs."""
    plan = load_plan(f"pretrain/{method}.json") if (plans_dir() / "pretrain" / f"{method}.json").is_file() else {}
    if protocol.protocol == REFERENCE:
        return Budget(method, int(plan.get("epochs", 100)), plan.get("steps_per_epoch"), int(plan.get("batch_size", 4)),
                      tuple(plan["patch_size"]) if plan.get("patch_size") else None)
    clash = [flag for flag in BUDGET_FLAGS if flag in pretrain_args]
    if clash:
        raise NnsslError(f"pretrain_args set {clash}, which the shared pretraining protocol fixes; set steps, "
                         f"global_batch, crop_size (and epochs) in the benchmark plan's \"pretraining\" section.")
    epochs = protocol.epochs or int(plan.get("epochs", 100))
    if protocol.steps % epochs:
        raise NnsslError(f"pretraining.steps {protocol.steps} is not a whole number of {method}'s {epochs} epochs "
                         f"(plans/pretrain/{method}.json); use a multiple of every method's epochs, or set "
                         f"pretraining.epochs.")
    return Budget(method, epochs, protocol.steps // epochs, protocol.global_batch, protocol.crop_size)
