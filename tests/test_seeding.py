"""Seeded fine-tuning does not depend on how busy the CPU is (``nnssl_trainers.seeding``).

nnU-Net's ``GaussianBlurTransform(benchmark=True)`` times an FFT against a direct convolution and keeps the
faster; both are timed here with a fake clock, the way a busy or an idle machine would time them.
"""
from __future__ import annotations

import itertools

import pytest
import torch
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.noise import gaussian_blur
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnssl.random_state import seed_everything
from nnssl_trainers.seeding import without_timed_choices
from nnssl_trainers.swinunetr import SwinUNETR_Scratch_Trainer


def _clock(fft_faster: bool):
    """A fake ``time()``: the 9 timed direct convolutions come first, then the 9 FFTs (1 or 3 ticks each)."""
    direct, fft = (3, 1) if fft_faster else (1, 3)
    ticks = itertools.accumulate(itertools.chain(*([0, d] for d in [direct] * 9 + [fft] * 9), itertools.repeat(0)))
    return lambda: next(ticks)


def _blurred(transform_factory, fft_faster: bool, monkeypatch) -> torch.Tensor:
    monkeypatch.setattr(gaussian_blur, "time", _clock(fft_faster))
    seed_everything(0)  # the blur draws its sigmas from NumPy and its channels from torch
    image = torch.rand(1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    return transform_factory()(image=image)["image"]


def _nnunet_blur():
    return RandomTransform(GaussianBlurTransform(blur_sigma=(0.5, 1.), synchronize_channels=False,
                                                 synchronize_axes=False, p_per_channel=1, benchmark=True),
                           apply_probability=1)


@pytest.mark.parametrize("factory, same", [(_nnunet_blur, False), (lambda: without_timed_choices(_nnunet_blur()), True)],
                         ids=["nnunet", "seeded"])
def test_the_blur_does_not_depend_on_timing(factory, same, monkeypatch):
    busy, idle = (_blurred(factory, fft_faster, monkeypatch) for fft_faster in (True, False))
    assert torch.equal(busy, idle) is same


def _blurs(transform) -> list[GaussianBlurTransform]:
    found = [transform] if isinstance(transform, GaussianBlurTransform) else []
    for value in vars(transform).values():
        for inner in value if isinstance(value, list) else [value]:
            if isinstance(inner, BasicTransform):
                found += _blurs(inner)
    return found


def test_the_trainers_training_transforms_time_nothing():
    args = ((64, 64, 64), (-0.5, 0.5), None, (0, 1, 2), False)
    options = dict(use_mask_for_norm=[False], foreground_labels=[1])
    assert [b.benchmark for b in _blurs(nnUNetTrainer.get_training_transforms(*args, **options))] == [True]
    assert [b.benchmark for b in _blurs(SwinUNETR_Scratch_Trainer.get_training_transforms(*args, **options))] == [False]
