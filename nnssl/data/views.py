"""Turn one region of a preprocessed volume into the views, masks and labels a method's ViewSpec asks for.

Spatial sampling (random resized crops) and augmentation (:mod:`nnssl.data.augmentations`) use
batchgeneratorsv2 transforms, as nnU-Net's own training does; the hand-written pieces are the block-mask
generator, the quarter-turn rotation and Swin UNETR SSL's batch-level inpainting corruption
(:mod:`nnssl.data.inpainting`), which have no transform there.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import numpy as np
import torch
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from torch import Tensor
from torch.utils.data import default_collate

from nnssl.data.augmentations import augmentation
from nnssl.data.inpainting import inpainting_corruption
from nnssl.data.spec import MaskSpec, ViewSpec
from nnssl.errors import NnsslError

ROTATION_PLANES = ((1, 2), (0, 2), (0, 1))  # spatial axes rotated about axis 0, 1, 2 (axis 0: axial plane)


def crop_transform(output_size: Sequence[int], scale: tuple[float, float], pad_value: float,
                   by_volume: bool = False) -> BasicTransform:
    """A random crop of ``output_size`` whose covered side is ``scale`` times the output side (resized); with
    ``by_volume``, ``scale`` bounds the covered volume (in output volumes), drawn uniformly, as the 3D analogue
    of a 2D random resized crop's uniform area fraction."""
    sides = tuple(s ** (1 / 3) for s in scale) if by_volume else scale
    # a covered side within 2% of the output side is a plain crop (rounded region sides give 1.002, 1.008, ...)
    resize = not all(math.isclose(s, 1.0, rel_tol=0.02) for s in sides)
    scaling = functools.partial(_side_of_uniform_volume, scale) if by_volume and scale[0] != scale[1] else sides
    return SpatialTransform(
        patch_size=tuple(output_size), patch_center_dist_from_border=[s // 2 for s in output_size],
        random_crop=True, p_scaling=1.0 if resize else 0.0, scaling=scaling, p_synchronize_scaling_across_axes=1,
        p_rotation=0.0, padding_mode_image="constant", padding_value_image=pad_value,
    )


def _side_of_uniform_volume(volume: tuple[float, float], **_) -> float:
    # batchgeneratorsv2 draws from numpy's global stream (seeded per loader worker)
    return float(np.random.uniform(*volume)) ** (1 / 3)


def block_mask(grid: Sequence[int], block: int, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """Bool mask on a token ``grid`` made of ``block``^3-token cubes; ``round(ratio * cubes)`` cubes are masked.

    As SimMIM's mask generator (Xie et al. 2022), in 3D: cubes are aligned to the grid, so a 16^3-voxel
    block with Swin patch 2 is exactly one stage-3 token (stride 16).
    """
    blocks = [g // block for g in grid]
    if any(b * block != g for b, g in zip(blocks, grid)) or min(blocks) < 1:
        raise ValueError(f"token grid {tuple(grid)} is not a whole number of {block}^3-token blocks")
    count = math.prod(blocks)
    chosen = rng.permutation(count)[: int(round(ratio * count))]
    mask = np.zeros(count, dtype=bool)
    mask[chosen] = True
    mask = mask.reshape(blocks)
    for axis in range(3):
        mask = np.repeat(mask, block, axis=axis)
    return mask


def default_local_size(patch_size: Sequence[int], token_patch: int) -> tuple[int, int, int]:
    """Local crops of half the patch side (DINO's 96 of 224 is 0.43) on the Swin's input grid: multiples of
    ``token_patch ** 5`` (MONAI's divisor, 32 for patch 2), at least one multiple."""
    divisor = token_patch**5
    return tuple(max(divisor, s // 2 // divisor * divisor) for s in patch_size)


class ViewMaker:
    """Makes one sample's views from its region, per a :class:`ViewSpec` (see :mod:`nnssl.data.spec`), and
    stacks samples into a batch (:meth:`collate`, where batch-level corruption happens)."""

    def __init__(self, spec: ViewSpec, patch_size: Sequence[int], token_patch: int):
        self.spec = spec
        self.patch_size = tuple(int(s) for s in patch_size)
        self.token_patch = token_patch
        self.local_size = spec.local_size or default_local_size(self.patch_size, token_patch)
        if spec.rotate == "axial" and self.patch_size[1] != self.patch_size[2]:
            raise NnsslError(f"Axial rotation prediction needs equal in-plane patch sides, got {self.patch_size}; "
                             f"use --patch-size with equal Y and Z.")
        if spec.rotate == "any" and len(set(self.patch_size)) != 1:
            raise NnsslError(f"Rotation prediction about any axis needs a cubic patch, got {self.patch_size}; use "
                             f"--patch-size N N N, or --plans-override method.axes=axial.")
        # flips and extra quarter turns would make rotation labels ambiguous; keep flips along the rotation axis
        mirror_axes = {None: (0, 1, 2), "axial": (0,), "any": ()}[spec.rotate]
        square = (1, 2) if self.patch_size[1] == self.patch_size[2] else ()
        rot90_axes = (tuple(range(3)) if len(set(self.patch_size)) == 1 else square) if spec.rotate is None else ()
        # with 'asymmetric', view 1 and view 2 get BYOL's view-1 and view-2 augmentation (the second one
        # solarized), DINO's local crops theirs; the other schemes treat every view alike
        self.global_augments = [augmentation(spec.augment, mirror_axes, rot90_axes, view="global2" if i == 2 else
                                             "global1") for i in range(1, spec.global_views + 1)]
        self.local_augment = augmentation(spec.augment, mirror_axes, rot90_axes, view="local")

    @property
    def region_size(self) -> tuple[int, int, int]:
        return tuple(int(round(s * self.spec.region_factor)) for s in self.patch_size)

    def _crop(self, region: Tensor, size: Sequence[int], scale: tuple[float, float], pad: float) -> Tensor:
        # bgv2 scales grid coordinates: a factor f covers f * output side, so the region fraction s needs
        # f = s * region_side / output_side (and a volume fraction v needs f^3 = v * (region_side / output_side)^3)
        factor = self.region_size[0] / size[0]
        by_volume = self.spec.scale_by == "volume"
        power = 3 if by_volume else 1
        transform = crop_transform(size, (scale[0] * factor**power, scale[1] * factor**power), pad, by_volume)
        crop = transform(image=region)["image"]
        # a plain crop comes back as a view of the region; the in-place intensity transforms that follow would
        # write into the region and so into every later view of this sample
        return crop.clone() if crop.untyped_storage().data_ptr() == region.untyped_storage().data_ptr() else crop

    def __call__(self, region: Tensor, rng: np.random.Generator) -> dict[str, Tensor]:
        """``region``: ``(C, *region_size)`` float tensor. Returns the sample's entries of the batch contract
        (with ``cutout``, the views before corruption: :meth:`collate` corrupts them batch-wise)."""
        spec, out = self.spec, {}
        pad = float(region.min())
        for i, augment in enumerate(self.global_augments, start=1):
            view = augment(image=self._crop(region, self.patch_size, spec.global_scale, pad))["image"]
            if spec.rotate is not None:
                axis = int(rng.integers(3)) if spec.rotate == "any" else 0
                k = int(rng.integers(4))
                plane = tuple(d + 1 for d in ROTATION_PLANES[axis])  # + channel axis
                view = torch.rot90(view, k, dims=plane)
                out[f"rot{i}"] = torch.tensor(k)
                if spec.rotate == "any":
                    out[f"rot_axis{i}"] = torch.tensor(axis)
            if spec.mask is not None:
                out[f"mask{i}"] = torch.from_numpy(self._mask(spec.mask, rng))
            out[f"clean{i}" if spec.cutout else f"view{i}"] = view.contiguous()
        for i in range(1, spec.local_views + 1):
            local = self._crop(region, self.local_size, spec.local_scale, pad)
            out[f"local{i}"] = self.local_augment(image=local)["image"].contiguous()
        return out

    def collate(self, samples: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Stack samples into a batch (in the loader worker). With ``cutout``, each ``view<i>`` is its
        ``clean<i>`` corrupted by Tang et al.'s inpainting drop, pasting from other samples of the batch."""
        batch = default_collate(samples)
        if self.spec.cutout:
            # a generator seeded from numpy's global stream, which the loader seeds per worker
            rng = np.random.default_rng(np.random.randint(2**31))
            for i in range(1, self.spec.global_views + 1):
                batch[f"view{i}"] = inpainting_corruption(batch[f"clean{i}"], rng)[0]
        return batch

    def _mask(self, mask: MaskSpec, rng: np.random.Generator) -> np.ndarray:
        grid = [s // self.token_patch for s in self.patch_size]
        unmasked = mask.p_unmasked > 0 and rng.uniform() < mask.p_unmasked
        ratio = 0.0 if unmasked else float(rng.uniform(*mask.ratio))
        return block_mask(grid, mask.block_size // self.token_patch, ratio, rng)
