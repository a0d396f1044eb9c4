"""What the data layer can deliver per sample: the views, crops, masks and labels a method asks for.

Methods describe their needs with a :class:`ViewSpec`; :class:`nnssl.data.views.ViewMaker` and the loader
produce them. This module knows no method.

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
from typing import Literal


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
