"""Learning-rate, weight-decay, momentum and temperature schedules as pure functions of progress."""
from __future__ import annotations

import math

from torch.optim import Optimizer


def warmup_cosine(t: float, total: float, warmup: float, start: float, end: float,
                  warmup_from: float = 0.0) -> float:
    """Linear warmup from ``warmup_from`` to ``start`` over ``warmup``, then cosine from ``start`` to ``end``.

    ``t`` and the lengths are in any unit (steps or epochs); ``t >= total`` gives ``end``.
    """
    if warmup > 0 and t < warmup:
        return warmup_from + (start - warmup_from) * t / warmup
    if t >= total:
        return end
    progress = (t - warmup) / max(total - warmup, 1e-12)
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))


def ema_momentum(base: float, step: int, total: int) -> float:
    """Cosine from ``base`` to 1 over the run (BYOL/DINO/MoCo v3 teacher schedule)."""
    return 1.0 - (1.0 - base) * (math.cos(math.pi * step / max(total, 1)) + 1.0) / 2.0


def linear_warmup_then_constant(t: float, warmup: float, start: float, end: float) -> float:
    """``start`` -> ``end`` linearly over ``warmup``, then ``end`` (DINO's teacher temperature)."""
    if warmup <= 0 or t >= warmup:
        return end
    return start + (end - start) * t / warmup


class EpochWarmupCosineLR:
    """Per-epoch LR for nnU-Net trainers (``step(epoch)`` is called at each epoch start).

    Epoch ``e < warmup_epochs`` gets ``initial_lr * (e + 1) / (warmup_epochs + 1)``; then cosine decay to
    ``final_lr`` after the last epoch. Stateless: ``--c`` restores the epoch, and with it the LR.
    """

    def __init__(self, optimizer: Optimizer, initial_lr: float, num_epochs: int, warmup_epochs: int,
                 final_lr: float = 0.0):
        self.optimizer = optimizer
        self.initial_lr, self.final_lr = initial_lr, final_lr
        self.num_epochs, self.warmup_epochs = num_epochs, warmup_epochs

    def lr_at(self, epoch: int) -> float:
        if epoch < self.warmup_epochs:
            return self.initial_lr * (epoch + 1) / (self.warmup_epochs + 1)
        return warmup_cosine(epoch, self.num_epochs, self.warmup_epochs, self.initial_lr, self.final_lr)

    def step(self, epoch: int) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(epoch)
