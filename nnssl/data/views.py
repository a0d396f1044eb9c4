"""Turn one region of a preprocessed volume into the views, masks and labels a method's ViewSpec asks for.

Spatial sampling (random resized crops) and augmentation use batchgeneratorsv2 transforms, as nnU-Net's
own training does; the only hand-written pieces are the block-mask generator and the quarter-turn rotation,
which have no transform there.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.intensity.brightness import (BrightnessAdditiveTransform,
                                                               MultiplicativeBrightnessTransform)
from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.noise.blank_rectangle import BlankRectangleTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.rot90 import Rot90Transform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from torch import Tensor

from nnssl.errors import NnsslError
from nnssl.data.spec import MaskSpec, ViewSpec

ROTATION_PLANES = ((1, 2), (0, 2), (0, 1))  # spatial axes rotated about axis 0, 1, 2 (axis 0: axial plane)


def crop_transform(output_size: Sequence[int], scale: tuple[float, float], pad_value: float) -> BasicTransform:
    """A random crop of ``output_size`` whose covered side is ``scale`` times the output side (resized)."""
    # a covered side within 2% of the output side is a plain crop (rounded region sides give 1.002, 1.008, ...)
    resize = not all(math.isclose(s, 1.0, rel_tol=0.02) for s in scale)
    return SpatialTransform(
        patch_size=tuple(output_size), patch_center_dist_from_border=[s // 2 for s in output_size],
        random_crop=True, p_scaling=1.0 if resize else 0.0, scaling=scale, p_synchronize_scaling_across_axes=1,
        p_rotation=0.0, padding_mode_image="constant", padding_value_image=pad_value,
    )


def augmentation(strength: str, mirror_axes: tuple[int, ...], rot90_axes: tuple[int, ...] = ()) -> BasicTransform:
    """``light``: flips and mild brightness. ``strong`` (contrastive methods): flips, quarter turns in the plane of
    ``rot90_axes`` (equal sides only, so shapes are kept), brightness scale and shift, contrast, gamma, Gaussian
    noise and blur, each applied at random."""
    transforms: list[BasicTransform] = [MirrorTransform(allowed_axes=mirror_axes)] if mirror_axes else []
    if strength == "strong" and len(rot90_axes) >= 2:
        transforms.append(RandomTransform(Rot90Transform(1, allowed_axes=set(rot90_axes)), apply_probability=0.5))
    if strength == "light":
        transforms.append(RandomTransform(MultiplicativeBrightnessTransform((0.9, 1.1), synchronize_channels=True),
                                          apply_probability=0.3))
    else:
        transforms += [
            RandomTransform(MultiplicativeBrightnessTransform(BGContrast((0.7, 1.3)), synchronize_channels=True),
                            apply_probability=0.8),
            RandomTransform(BrightnessAdditiveTransform(mu=0.0, sigma=0.2), apply_probability=0.8),
            RandomTransform(ContrastTransform(BGContrast((0.7, 1.3)), preserve_range=True,
                                              synchronize_channels=True), apply_probability=0.5),
            RandomTransform(GammaTransform(BGContrast((0.7, 1.5)), p_invert_image=0, synchronize_channels=True,
                                           p_per_channel=1, p_retain_stats=1), apply_probability=0.3),
            RandomTransform(GaussianNoiseTransform(noise_variance=(0, 0.1), synchronize_channels=True),
                            apply_probability=0.5),
            RandomTransform(GaussianBlurTransform(blur_sigma=(0.5, 1.5), synchronize_channels=True,
                                                  synchronize_axes=True), apply_probability=0.5),
        ]
    return ComposeTransforms(transforms)


def cutout_transform(output_size: Sequence[int]) -> BasicTransform:
    """Swin UNETR SSL's inpainting corruption (Tang et al. 2022): 2-8 random boxes of 1/8-1/3 of each side
    (up to about 30% of the voxels) filled with a random intensity from the view's range."""
    sizes = tuple((max(1, s // 8), max(2, s // 3)) for s in output_size)
    return BlankRectangleTransform(rectangle_size=sizes, rectangle_value=_random_intensity, num_rectangles=(2, 8))


def _random_intensity(x: Tensor) -> float:
    low, high = float(x.min()), float(x.max())
    return float(np.random.uniform(low, high)) if high > low else low


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
    """Makes one sample's views from its region, per a :class:`ViewSpec` (see ``nnssl.methods.base``)."""

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
        rot90_axes = tuple(range(3)) if len(set(self.patch_size)) == 1 else square
        self.augment = augmentation(spec.augment, mirror_axes, rot90_axes if spec.rotate is None else ())
        self.cutout = cutout_transform(self.patch_size) if spec.cutout else None

    @property
    def region_size(self) -> tuple[int, int, int]:
        return tuple(int(round(s * self.spec.region_factor)) for s in self.patch_size)

    def _crop(self, region: Tensor, size: Sequence[int], scale: tuple[float, float], pad: float) -> Tensor:
        # bgv2 scales grid coordinates: a factor f covers f * output side, so the region fraction s needs
        # f = s * region_side / output_side
        factor = self.region_size[0] / size[0]
        transform = crop_transform(size, (scale[0] * factor, scale[1] * factor), pad)
        return transform(image=region)["image"]

    def __call__(self, region: Tensor, rng: np.random.Generator) -> dict[str, Tensor]:
        """``region``: ``(C, *region_size)`` float tensor. Returns the sample's entries of the batch contract."""
        spec, out = self.spec, {}
        pad = float(region.min())
        for i in range(1, spec.global_views + 1):
            view = self.augment(image=self._crop(region, self.patch_size, spec.global_scale, pad))["image"]
            if spec.rotate is not None:
                axis = int(rng.integers(3)) if spec.rotate == "any" else 0
                k = int(rng.integers(4))
                plane = tuple(d + 1 for d in ROTATION_PLANES[axis])  # + channel axis
                view = torch.rot90(view, k, dims=plane)
                out[f"rot{i}"] = torch.tensor(k)
                if spec.rotate == "any":
                    out[f"rot_axis{i}"] = torch.tensor(axis)
            if self.cutout is not None:
                out[f"clean{i}"] = view.clone()
                view = self.cutout(image=view)["image"]
            if spec.mask is not None:
                out[f"mask{i}"] = torch.from_numpy(self._mask(spec.mask, rng))
            out[f"view{i}"] = view.contiguous()
        for i in range(1, spec.local_views + 1):
            local = self._crop(region, self.local_size, spec.local_scale, pad)
            out[f"local{i}"] = self.augment(image=local)["image"].contiguous()
        return out

    def _mask(self, mask: MaskSpec, rng: np.random.Generator) -> np.ndarray:
        grid = [s // self.token_patch for s in self.patch_size]
        ratio = float(rng.uniform(*mask.ratio))
        return block_mask(grid, mask.block_size // self.token_patch, ratio, rng)
