"""Masked-image-modelling losses (SimMIM, Xie et al. 2022; SMIT, Jiang et al. 2022)."""
from __future__ import annotations

import torch
from torch import Tensor


def upsample_mask(mask: Tensor, factor: int) -> Tensor:
    """``(B, x, y, z)`` token mask -> ``(B, 1, x*f, y*f, z*f)`` voxel mask (each token covers f^3 voxels)."""
    voxels = mask[:, None]
    for dim in (2, 3, 4):
        voxels = voxels.repeat_interleave(factor, dim=dim)
    return voxels


def masked_l1(prediction: Tensor, target: Tensor, voxel_mask: Tensor) -> Tensor:
    """Mean absolute error over masked voxels only (SimMIM Eq. 1: "the loss is computed on masked pixels").

    ``prediction``, ``target``: ``(B, C, X, Y, Z)``; ``voxel_mask``: ``(B, 1, X, Y, Z)`` bool, True = masked.
    Unmasked voxels contribute nothing, whatever the prediction there. With no masked voxel the loss is 0.
    Computed in float32: under fp16 autocast the count of masked voxels (over 65504 for a batch of 4 at
    32^3) would overflow to inf and the loss to 0.
    """
    weight = voxel_mask.float()
    per_voxel = (prediction.float() - target.float()).abs() * weight
    count = weight.sum() * prediction.shape[1]
    return per_voxel.sum() / count.clamp_min(1.0)
