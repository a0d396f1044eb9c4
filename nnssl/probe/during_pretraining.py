"""``nnssl_pretrain --probe TASK [--probe-every K]``: the linear probe of the encoder being pretrained.

The run probes the encoder fine-tuning will use (:func:`nnssl.plans.finetune_encoder`: the EMA teacher for
DINO and iBOT, else the student) in its own process, on the task's data read once at the start
(:mod:`nnssl.probe.data`), so no second process or copy of the corpus is made. It probes before the first
step (the randomly initialised encoder: the run's own baseline), at the last step, and in between every K
steps, or by default whenever probing, the final probe included, stays within ``PROBE_BUDGET`` of the time
spent training so far. ``probe_dice`` (mean foreground Dice on the task's fold-0 validation cases) goes
into log.csv (empty on rows without a probe) and progress.png.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from nnssl.errors import NnsslError
from nnssl.methods.base import SSLMethod
from nnssl.plans import finetune_encoder
from nnssl.probe.data import ProbeCases, load_probe_data
from nnssl.probe.linear import ProbeSettings
from nnssl.probe.run import probe_encoder

log = logging.getLogger(__name__)

PROBE_BUDGET = 0.10  # the default schedule keeps the probes under this share of the training time
COLUMN = "probe_dice"


@dataclass(frozen=True)
class ProbeStep:
    """What probing did after one step: the mean Dice (None: no probe) and the seconds it took."""

    dice: float | None = None
    seconds: float = 0.0

    def columns(self) -> dict[str, Any]:
        return {COLUMN: "" if self.dice is None else self.dice}


class PretrainProbe:
    """Probes a pretraining run's fine-tuning encoder on ``task`` on the run's schedule (see the module)."""

    def __init__(self, task: str, method: str, in_channels: int, every: int | None, seed: int,
                 device: torch.device):
        self.data = load_probe_data(ProbeCases(dataset=task, seed=seed))
        if self.data.in_channels != in_channels:
            raise NnsslError(f"--probe {task}: the task has {self.data.in_channels} input channel(s), the pretraining "
                             f"corpus {in_channels}; probe on a task with the corpus's channels.")
        self.source = finetune_encoder(method)
        self.every, self.device = every, device
        self.settings = ProbeSettings(seed=seed)
        self.spent, self.count, self.last_cost = 0.0, 0, None
        self.started = time.perf_counter()
        self._initial: float | None = None

    def encoder(self, method: SSLMethod) -> nn.Module:
        teacher = method.teacher_encoder() if self.source == "teacher" else None
        return teacher if teacher is not None else method.encoder

    def probe(self, method: SSLMethod) -> ProbeStep:
        start = time.perf_counter()
        # the probe seeds its classifier; the run's own random stream must continue as if it had not probed
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            result = probe_encoder(self.encoder(method), self.data, self.settings, self.device, progress=False)
        dice = result["mean_dice"]
        seconds = time.perf_counter() - start
        self.spent, self.count, self.last_cost = self.spent + seconds, self.count + 1, seconds
        return ProbeStep(0.0 if dice is None else dice, seconds)

    def start(self, method: SSLMethod, step: int) -> None:
        """Probe the encoder as it starts (a fresh run only); its row is written before the first logged row."""
        self.started = time.perf_counter()
        if step == 0:
            self._initial = self.probe(method).dice

    def after_step(self, method: SSLMethod, done: int, total: int) -> ProbeStep:
        return self.probe(method) if self._due(done, total) else ProbeStep()

    def _due(self, done: int, total: int) -> bool:
        if done == total:
            return True
        if self.every is not None:
            return done % self.every == 0
        if self.last_cost is None:  # resumed run: measure what a probe costs
            return True
        # room for this probe and the final one within the budget of the training time so far
        return self.spent + 2 * self.last_cost <= PROBE_BUDGET * self.training_seconds()

    def training_seconds(self) -> float:
        return time.perf_counter() - self.started - self.spent

    def pending_rows(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        """The step-0 row (every column of ``row`` empty but step, epoch and probe_dice), once."""
        if self._initial is None:
            return []
        first = {**{key: "" for key in row}, "step": 0, "epoch": 0, COLUMN: self._initial}
        self._initial = None
        return [first]

    def report(self) -> str:
        total = self.training_seconds() + self.spent
        return (f"probe: {self.count} probes took {self.spent:.1f} s, {100 * self.spent / max(total, 1e-9):.1f}% of "
                f"the run's {total:.1f} s")
