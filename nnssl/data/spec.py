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
- ``clean1 .. cleanG``: ``(B, C, X, Y, Z)`` the view before the inpainting corruption, if ``cutout`` is set
  (the reconstruction target; ``view<i>`` is then the corrupted view)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class MaskSpec:
    """Random block masks: cubes of ``block_size`` voxels (aligned to the Swin token grid) until a fraction
    of the patch-embedding tokens drawn uniformly from ``ratio`` (a range, or one value twice) is masked; with
    probability ``p_unmasked`` a view is left unmasked instead (iBOT's ``pred_ratio 0 0.3``)."""

    ratio: tuple[float, float] = (0.6, 0.6)
    block_size: int = 16
    p_unmasked: float = 0.0


@dataclass(frozen=True)
class ViewSpec:
    """What a method asks the loader for, per sample.

    All views of one sample are cut from one random region of the volume whose side is ``region_factor``
    times the patch side (so views overlap, and ``region_factor`` bounds how far apart they can lie). A global
    view covers a cube of side ``region * s`` with ``s`` drawn from ``global_scale``, resized to the patch size
    (a 3D random resized crop); a local view covers ``region * s``, ``s`` from ``local_scale``, resized to
    ``local_size`` (None: half the patch, :func:`nnssl.data.views.default_local_size`). ``scale_by="volume"``:
    the scales are fractions of the region's volume instead, drawn uniformly (a 2D random resized crop's area
    fraction, in 3D). With the defaults a global view is a plain patch-sized crop. ``augment`` names a scheme
    of :mod:`nnssl.data.augmentations`: ``"light"`` (flips, mild intensity), ``"strong"`` (flips, quarter
    turns, intensity scale/shift, contrast, gamma, noise, blur, alike for every view) or ``"asymmetric"``
    (BYOL's two asymmetric views, as MoCo v3 and DINO run them: colour-jitter analogue, blur at 1.0 / 0.1 / 0.5
    for global 1, global 2 and local views, inversion of global 2 at 0.2), drawn independently per view.
    ``cutout``: the global views are corrupted batch-wise for inpainting (:mod:`nnssl.data.inpainting`) and
    their clean versions delivered too.
    """

    global_views: int = 1
    local_views: int = 0
    local_size: tuple[int, int, int] | None = None
    region_factor: float = 1.0
    global_scale: tuple[float, float] = (1.0, 1.0)
    local_scale: tuple[float, float] = (0.3, 0.6)
    scale_by: Literal["side", "volume"] = "side"
    augment: Literal["light", "strong", "asymmetric"] = "light"
    mask: MaskSpec | None = None
    rotate: Literal["axial", "any"] | None = None
    cutout: bool = False
