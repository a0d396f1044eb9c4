"""The face every SSL method shows the shared pretraining loop.

A method declares; the loop acts. A method owns its heads and teacher, says which views it needs
(:class:`ViewSpec`), turns a batch into named loss terms, and exposes ``encoder`` (the student Swin
backbone whose weights go into SwinUNETR). Optimisation, schedules, EMA updates, AMP, DDP, logging and
checkpoints live in ``nnssl/pretrain`` and are written once.

Batch contract (what the loader yields for a :class:`ViewSpec`; tensors on the training device):

- ``view1 .. viewG``: ``(B, C, X, Y, Z)`` global views of the run's patch size (G = ``global_views``)
- ``local1 .. localL``: ``(B, C, x, y, z)`` local crops (L = ``local_views``, size ``local_size``)
- ``mask1 .. maskG``: ``(B, X/p, Y/p, Z/p)`` bool block masks on the patch-embedding grid (p = Swin patch
  size), if ``mask`` is set; True = masked
- ``rot1 .. rotG``: ``(B,)`` int64 quarter turns k in 0..3 applied to the view, if ``rotate`` is set;
  with ``rotate="any"`` also ``rot_axis1 ..``: ``(B,)`` int64 rotation axis 0..2 (plane of the other two)
- ``clean1 .. cleanG``: ``(B, C, X, Y, Z)`` the view before cutout, if ``cutout`` is set (inpainting target)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Iterable, Literal

from torch import Tensor, nn

from nnssl.networks.swin import SwinEncoder

FAMILIES = ("contrastive", "rotation", "mim", "self-distillation")


@dataclass(frozen=True)
class MaskSpec:
    """Random block masks: cubes of ``block_size`` voxels (aligned to the Swin token grid) until a fraction
    of the patch-embedding tokens drawn uniformly from ``ratio`` (a range, or one value twice) is masked."""

    ratio: tuple[float, float] = (0.6, 0.6)
    block_size: int = 16


@dataclass(frozen=True)
class ViewSpec:
    """What a method asks the loader for, per sample.

    All views of one sample are cut from one random region of the volume whose side is ``region_factor``
    times the patch side (so views overlap; SMIT's "two views from one larger region"). A global view
    covers a cube of side ``region * s`` with ``s`` drawn from ``global_scale``, resized to the patch size
    (a 3D random resized crop); a local view covers ``region * s``, ``s`` from ``local_scale``, resized to
    ``local_size`` (None: half the patch, :func:`nnssl.data.views.default_local_size`). With the defaults a global view is a plain patch-sized crop. ``augment``: ``"light"``
    (flips, mild intensity) or ``"strong"`` (contrastive: flips, intensity scale/shift, contrast, gamma,
    noise, blur), drawn independently per view.
    """

    global_views: int = 1
    local_views: int = 0
    local_size: tuple[int, int, int] | None = None
    region_factor: float = 1.0
    global_scale: tuple[float, float] = (1.0, 1.0)
    local_scale: tuple[float, float] = (0.3, 0.6)
    augment: Literal["light", "strong"] = "light"
    mask: MaskSpec | None = None
    rotate: Literal["axial", "any"] | None = None
    cutout: bool = False


class SSLMethod(nn.Module):
    """Base class of nnssl's SSL methods (register subclasses with ``@register_method("name")``).

    Subclasses take ``encoder`` first and their hyperparameters as keyword arguments with the paper's
    defaults (``plans/pretrain/<name>.json`` overrides them), and implement :meth:`loss` and
    :meth:`view_spec`. Methods with an EMA teacher set ``momentum`` (the base EMA momentum; the loop
    raises it to 1 on a cosine schedule) and return the (student, teacher) pairs from :meth:`ema_pairs`.
    """

    name: ClassVar[str] = ""
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
