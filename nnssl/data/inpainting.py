"""Swin UNETR SSL's inpainting corruption (Tang et al. CVPR 2022), on a batch of views.

As ``aug_rand`` and ``patch_rand_drop`` in MONAI research-contributions SwinUNETR/Pretrain/utils/ops.py: each
view first gets random boxes filled with noise until a drawn fraction U(0, ``max_drop``) of its voxels has been
covered (counting overlaps twice, as the reference does), then the same again with boxes pasted from another
sample of the batch ("inner cutout"). Box sides are drawn between ``tolerance`` and ``max_block`` of the view's
side. On average about a quarter of the voxels end up corrupted, half of them noise and half pasted.

Two departures: the noise is scaled to the view's own intensity range (the reference scales it to [0, 1], its
data range after ScaleIntensityRange; nnU-Net-normalised CT has none fixed), and the pasted blocks always come
from a different sample (the reference draws any sample, itself included, so a batch of B pastes with
probability (B - 1) / B); a batch of one sample gets noise only.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

KEPT, NOISE, PASTED = 0, 1, 2  # the source map's values


def inpainting_corruption(views: Tensor, rng: np.random.Generator, max_drop: float = 0.3, max_block: float = 0.25,
                          tolerance: float = 0.05) -> tuple[Tensor, Tensor]:
    """``views``: ``(B, C, X, Y, Z)``. Returns the corrupted copy and a ``(B, X, Y, Z)`` uint8 map of where each
    voxel came from (:data:`KEPT`, :data:`NOISE`, :data:`PASTED`); ``views`` is left unchanged."""
    clean = views.detach().cpu().numpy()
    corrupted = clean.copy()
    source = np.full((clean.shape[0], *clean.shape[2:]), KEPT, dtype=np.uint8)
    n, channels, shape = clean.shape[0], clean.shape[1], clean.shape[2:]
    for i in range(n):
        low, high = float(clean[i].min()), float(clean[i].max())  # the fill's range comes from the whole view
        for box in _boxes(shape, rng, max_drop, max_block, tolerance):
            noise = rng.standard_normal((channels, *(s.stop - s.start for s in box)), dtype=np.float32)
            noise -= noise.min()
            noise *= (high - low) / max(float(noise.max()), 1e-12)
            corrupted[(i, slice(None), *box)] = low + noise
            source[(i, *box)] = NOISE
        if n > 1:
            other = (i + 1 + int(rng.integers(n - 1))) % n  # any sample but i
            for box in _boxes(shape, rng, max_drop, max_block, tolerance):
                corrupted[(i, slice(None), *box)] = clean[(other, slice(None), *box)]
                source[(i, *box)] = PASTED
    return torch.from_numpy(corrupted).to(views.device), torch.from_numpy(source)


def _boxes(shape: Sequence[int], rng: np.random.Generator, max_drop: float, max_block: float,
           tolerance: float) -> list[tuple[slice, ...]]:
    """Random boxes whose volumes add up to at least U(0, ``max_drop``) of ``shape`` (patch_rand_drop's loop,
    drawn 64 boxes at a time)."""
    shape = np.asarray(shape)
    target = rng.uniform(0, max_drop) * float(np.prod(shape))
    largest = np.maximum((shape * max_block).astype(int), 1)
    smallest = np.minimum((shape * tolerance).astype(int), largest - 1)
    starts, ends, covered = [], [], 0.0
    while covered < target:
        start = rng.integers(0, shape - smallest, size=(64, 3))
        end = np.minimum(start + rng.integers(smallest, largest, size=(64, 3)), shape)
        end = np.maximum(end, start + 1)
        volume = np.cumsum(np.prod(end - start, axis=1)) + covered
        count = int(np.searchsorted(volume, target)) + 1  # boxes until the target is reached (all 64 if not)
        starts.append(start[:count])
        ends.append(end[:count])
        covered = float(volume[min(count, 64) - 1])
    return [tuple(slice(int(a), int(e)) for a, e in zip(start, end))
            for start, end in zip(np.concatenate(starts), np.concatenate(ends))]
