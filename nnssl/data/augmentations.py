"""Per-view intensity and flip augmentations, built from batchgeneratorsv2 transforms (as nnU-Net's training).

Three schemes, named by :attr:`nnssl.data.spec.ViewSpec.augment`:

- ``light``: flips and a mild brightness scale (masked-image and rotation methods).
- ``strong``: the same for every view: flips, quarter turns, brightness scale and shift, contrast, gamma,
  Gaussian noise and blur, each at random (SimCLR).
- ``asymmetric``: BYOL's two asymmetric views (Grill et al. 2020, Table 6; google-deepmind/deepmind-research
  byol/utils/augmentations.py ``augment_config`` view1 / view2), which MoCo v3 (facebookresearch/moco-v3
  main_moco.py ``augmentation1`` / ``augmentation2``) takes unchanged and DINO (facebookresearch/dino
  main_dino.py ``DataAugmentationDINO``; iBOT's ``DataAugmentationiBOT`` is the same) extends with local crops,
  in 3D with the references' per-view probabilities:

  ============================================  ==========================================================
  BYOL / MoCo v3 / DINO (2D, RGB)                3D analogue here
  ============================================  ==========================================================
  horizontal flip, p 0.5                         MirrorTransform: each allowed axis flipped with p 0.5
  ColorJitter(0.4, 0.4, 0.2, 0.1), p 0.8         one RandomTransform, p 0.8: brightness x U(0.6, 1.4),
                                                 contrast x U(0.6, 1.4), gamma U(0.7, 1.5) (saturation and
                                                 hue have no single-channel analogue; gamma is the
                                                 non-linear intensity change in their place)
  grayscale, p 0.2                               none (CT is one channel)
  Gaussian blur, sigma U(0.1, 2): p 1.0 view 1   GaussianBlurTransform, sigma U(0.1, 2) voxels, same
  (global 1), 0.1 view 2 (global 2), 0.5 DINO's  per-view probabilities
  local crops
  solarization: p 0.2 view 2 (global 2) only     InvertImageTransform (intensities mirrored about the view
                                                 mean), p 0.2, view 2 only
  ============================================  ==========================================================
"""
from __future__ import annotations

from typing import Literal

from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.intensity.brightness import (BrightnessAdditiveTransform,
                                                               MultiplicativeBrightnessTransform)
from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.intensity.inversion import InvertImageTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.rot90 import Rot90Transform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.random import RandomTransform

ViewKind = Literal["global1", "global2", "local"]
# per-view probabilities of Gaussian blur and solarization: BYOL's view1 / view2 (global 1 / 2), DINO's locals
ASYMMETRIC_BLUR = {"global1": 1.0, "global2": 0.1, "local": 0.5}
ASYMMETRIC_SOLARIZE = {"global1": 0.0, "global2": 0.2, "local": 0.0}


def augmentation(strength: str, mirror_axes: tuple[int, ...], rot90_axes: tuple[int, ...] = (),
                 view: ViewKind = "global1") -> BasicTransform:
    """The ``strength`` scheme (see the module docstring) for one kind of ``view``; flips along
    ``mirror_axes``; ``strong`` also turns in the plane of ``rot90_axes`` (equal sides only, so shapes are
    kept). Only ``asymmetric`` differs between views."""
    transforms: list[BasicTransform] = [MirrorTransform(allowed_axes=mirror_axes)] if mirror_axes else []
    if strength == "light":
        transforms.append(RandomTransform(MultiplicativeBrightnessTransform((0.9, 1.1), synchronize_channels=True),
                                          apply_probability=0.3))
    elif strength == "asymmetric":
        transforms += _asymmetric_intensity(view)
    else:
        if len(rot90_axes) >= 2:
            transforms.append(RandomTransform(Rot90Transform(1, allowed_axes=set(rot90_axes)), apply_probability=0.5))
        transforms += [
            RandomTransform(MultiplicativeBrightnessTransform(BGContrast((0.7, 1.3)), synchronize_channels=True),
                            apply_probability=0.8),
            RandomTransform(BrightnessAdditiveTransform(mu=0.0, sigma=0.2), apply_probability=0.8),
            RandomTransform(ContrastTransform(BGContrast((0.7, 1.3)), preserve_range=True,
                                              synchronize_channels=True), apply_probability=0.5),
            RandomTransform(_gamma((0.7, 1.5)), apply_probability=0.3),
            RandomTransform(GaussianNoiseTransform(noise_variance=(0, 0.1), synchronize_channels=True),
                            apply_probability=0.5),
            RandomTransform(_blur((0.5, 1.5)), apply_probability=0.5),
        ]
    return ComposeTransforms(transforms)


def _asymmetric_intensity(view: ViewKind) -> list[BasicTransform]:
    colour_jitter = ComposeTransforms([
        MultiplicativeBrightnessTransform(BGContrast((0.6, 1.4)), synchronize_channels=True),
        ContrastTransform(BGContrast((0.6, 1.4)), preserve_range=True, synchronize_channels=True),
        _gamma((0.7, 1.5)),
    ])
    transforms: list[BasicTransform] = [RandomTransform(colour_jitter, apply_probability=0.8),
                                        RandomTransform(_blur((0.1, 2.0)), apply_probability=ASYMMETRIC_BLUR[view])]
    if ASYMMETRIC_SOLARIZE[view]:
        transforms.append(InvertImageTransform(p_invert_image=ASYMMETRIC_SOLARIZE[view]))
    return transforms


def _gamma(gamma: tuple[float, float]) -> BasicTransform:
    return GammaTransform(BGContrast(gamma), p_invert_image=0, synchronize_channels=True, p_per_channel=1,
                          p_retain_stats=1)


def _blur(sigma: tuple[float, float]) -> BasicTransform:
    return GaussianBlurTransform(blur_sigma=sigma, synchronize_channels=True, synchronize_axes=True)
