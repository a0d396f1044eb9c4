"""The face every SSL method shows the shared pretraining loop.

A method declares; the loop acts. A method owns its heads and teacher, says which views it needs
(:class:`ViewSpec`), turns a batch into named loss terms, and exposes ``encoder`` (the student Swin
backbone whose weights go into SwinUNETR). Optimisation, schedules, EMA updates, AMP, DDP, logging and
checkpoints live in ``nnssl/pretrain`` and are written once.

What the loader delivers for a method's :class:`~nnssl.data.spec.ViewSpec` (the batch contract) is
described in :mod:`nnssl.data.spec`.
"""
from __future__ import annotations

from typing import ClassVar, Iterable

from torch import Tensor, nn

from nnssl.data.spec import ViewSpec
from nnssl.networks.swin import SwinEncoder

FAMILIES = ("contrastive", "rotation", "mim", "self-distillation")


class SSLMethod(nn.Module):
    """Base class of nnssl's SSL methods (register subclasses with ``@register_method("name")``).

    Subclasses take ``encoder`` first and their hyperparameters as keyword arguments with the paper's
    defaults (``plans/pretrain/<name>.json`` overrides them), and implement :meth:`loss` and
    :meth:`view_spec`. Methods with an EMA teacher set ``momentum`` (the base EMA momentum; the loop
    raises it to 1 on a cosine schedule) and return the (student, teacher) pairs from :meth:`ema_pairs`.
    """

    name: ClassVar[str] = ""
    trainer: ClassVar[str] = ""  # the nnU-Net trainer class fine-tuning its encoders (set by register_method)
    family: ClassVar[str] = ""
    description: ClassVar[str] = ""
    momentum: float | None = None

    def __init__(self, encoder: SwinEncoder):
        super().__init__()
        self.encoder = encoder

    def view_spec(self) -> ViewSpec:
        raise NotImplementedError

    def loss(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """``{"loss": total to backpropagate, <term>: value, ...}``; extra entries are detached log values."""
        raise NotImplementedError

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(student, teacher) module pairs the loop updates by EMA after each optimizer step."""
        return []

    def teacher_encoder(self) -> SwinEncoder | None:
        """The teacher's Swin encoder, if the method has one (exported as ``encoder_teacher_final.pth``)."""
        return None

    def on_step(self, epoch: float) -> dict[str, float]:
        """Update schedules kept by the method (e.g. teacher temperature) for fractional ``epoch``; returns
        the values to log."""
        return {}

    def frozen_parameters(self, epoch: float) -> Iterable[nn.Parameter]:
        """Parameters whose gradients the loop drops at this epoch (e.g. DINO's last layer in epoch 0)."""
        return ()

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        # DistributedDataParallel synchronises gradients of what runs through forward(), so the loop calls this.
        return self.loss(batch)
