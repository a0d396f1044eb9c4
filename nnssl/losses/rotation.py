"""Rotation prediction in 3D: which of the distinct quarter-turn rotations was applied to a view.

Gidaris et al. (ICLR 2018, https://arxiv.org/abs/1803.07728) classify 4 rotations of a 2D image. In 3D
two schemes are used:

- ``"axial"``: k quarter turns (k = 0..3) in the axial plane only; 4 classes, label ``k``
  (Tang et al. CVPR 2022, Swin UNETR SSL).
- ``"any"``: k quarter turns about one of the three axes (the rotation is in the plane of the other two).
  Turning by 0 is the identity whatever the axis, so there are 10 distinct rotations (Taleb et al.,
  NeurIPS 2020, "3D self-supervised methods for medical imaging"): label 0 is the identity and
  ``1 + 3 * axis + (k - 1)`` the others.

The loader applies the rotations and reports ``rot`` (k) and, for ``"any"``, ``rot_axis`` per view.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from nnssl.errors import NnsslError

ROTATION_CLASSES = {"axial": 4, "any": 10}


def check_rotation_axes(axes: str, method: str) -> str:
    """``axes`` if it names a scheme in :data:`ROTATION_CLASSES`; otherwise an :class:`NnsslError`."""
    if axes not in ROTATION_CLASSES:
        raise NnsslError(f"{method}: axes must be one of {sorted(ROTATION_CLASSES)}, got {axes!r}. Set \"axes\" "
                         f"under \"method\" in plans/pretrain/{method}.json or with --plans-override method.axes=any.")
    return axes


def rotation_labels(turns: Tensor, axis: Tensor | None = None) -> Tensor:
    """Class index of each view's rotation.

    Args:
        turns: ``(B,)`` int64 quarter turns k in 0..3.
        axis: ``(B,)`` int64 rotation axis in 0..2 for the ``"any"`` scheme; None for ``"axial"``.

    Returns:
        ``(B,)`` int64: ``k`` (4 classes) without ``axis``; with it 0 for the identity and
        ``1 + 3 * axis + k - 1`` otherwise (10 classes).
    """
    if axis is None:
        return turns
    return (turns > 0) * (1 + 3 * axis + turns - 1)


def rotation_loss(logits: Tensor, turns: Tensor, axis: Tensor | None = None) -> Tensor:
    """Cross entropy of rotation logits against the applied rotations (Gidaris et al. 2018, Eq. 2).

    Args:
        logits: ``(B, 4)`` for the axial scheme or ``(B, 10)`` with ``axis``.
        turns, axis: as in :func:`rotation_labels`.

    Returns:
        scalar mean cross entropy; near 0 for a confident, correct classifier.
    """
    scheme = "axial" if axis is None else "any"
    if logits.ndim != 2 or logits.shape[1] != ROTATION_CLASSES[scheme]:
        raise ValueError(f"rotation_loss: the {scheme!r} scheme has {ROTATION_CLASSES[scheme]} classes; "
                         f"logits of shape {tuple(logits.shape)} do not match")
    return F.cross_entropy(logits, rotation_labels(turns, axis))
