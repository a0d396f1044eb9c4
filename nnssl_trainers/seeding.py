"""Seeded fine-tuning (``nnssl_seed``): the same seed gives the same run on the CPU, with or without DA workers.

nnU-Net seeds nothing, and its ``NonDetMultiThreadedAugmenter`` hands batches over in the order its workers
finish them. A seeded run therefore needs three things: Python, NumPy and torch seeded in the trainer before
the network is built; every data-augmentation worker seeded with its own seed (NumPy by batchgenerators,
torch and Python here: batchgeneratorsv2's transforms draw from torch); and batchgenerators'
``MultiThreadedAugmenter``, which returns the batches of its workers in a fixed round-robin order.
nnU-Net's training transforms also time themselves: its ``GaussianBlurTransform(benchmark=True)`` times an FFT
and a direct convolution on the first image of each shape and keeps the faster, and the two blur the same image
to slightly different numbers, so a busy CPU changed the batches; seeded runs blur by convolution only.
On a GPU, cuDNN's autotuned kernels (nnU-Net sets ``cudnn.benchmark``) may still make runs differ slightly.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import torch
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform

from nnssl.errors import NnsslError
from nnssl.plans_variants import SEED_KNOB
from nnssl.random_state import seed_everything

SEED_ENV = SEED_KNOB  # the knob a plans variant may set, read from the environment
DEFAULT_SEED = 0
_STREAMS = {"train": 1, "val": 2}  # separate seed streams for the two augmenters nnU-Net builds


def env_seed() -> int | None:
    """The whole number >= 0 in ``nnssl_seed``, or None when it is unset or empty."""
    value = os.environ.get(SEED_ENV, "")
    if value == "":
        return None
    if not value.strip().isdigit():
        raise NnsslError(f"Environment variable {SEED_ENV}={value!r} must be a whole number >= 0, e.g. "
                         f"{SEED_ENV}=1 (default {DEFAULT_SEED}).")
    return int(value)


def worker_seeds(seed: int, stream: str, count: int) -> list[int]:
    """``count`` independent seeds for the workers of one augmenter (``train`` or ``val``)."""
    return [int(s) for s in np.random.SeedSequence([seed, _STREAMS[stream]]).generate_state(count)]


def without_timed_choices(transform: Any) -> Any:
    """``transform`` (nested in nnU-Net's compose and random wrappers) with every blur's timing benchmark off."""
    if isinstance(transform, GaussianBlurTransform):
        transform.benchmark = False
    for value in vars(transform).values():
        for inner in value if isinstance(value, list) else [value]:
            if isinstance(inner, BasicTransform):
                without_timed_choices(inner)
    return transform


def _seeding_loader(data_loader: Any, seeds: list[int]) -> Any:
    """``data_loader`` whose ``set_thread_id`` (called first thing in each worker) also seeds Python and torch."""
    set_thread_id = data_loader.set_thread_id

    def seeded_set_thread_id(thread_id: int) -> None:
        # one intra-op thread, as nnU-Net's own augmenter sets: torch's thread pool does not survive the fork,
        # and a forked worker that calls into it (GaussianBlurTransform's convolutions) hangs
        torch.set_num_threads(1)
        seed_everything(seeds[thread_id])
        set_thread_id(thread_id)

    data_loader.set_thread_id = seeded_set_thread_id  # the worker gets its own (forked) copy of the loader
    return data_loader


@contextmanager
def ordered_augmenters(seed: int) -> Iterator[None]:
    """Inside the block, nnU-Net's trainer module builds seeded, order-preserving augmenters.

    ``nnUNetTrainer.get_dataloaders`` constructs ``NonDetMultiThreadedAugmenter`` inline, with no hook to
    override; the module-level name is swapped for the duration of that one call.
    """
    from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
    from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as trainer_module

    streams = iter(_STREAMS)

    def seeded_augmenter(data_loader: Any, transform: Any, num_processes: int, num_cached: int = 2,
                         seeds: Any = None, pin_memory: bool = False, wait_time: float = 0.02) -> Any:
        per_worker = worker_seeds(seed, next(streams), num_processes)
        return MultiThreadedAugmenter(_seeding_loader(data_loader, per_worker), transform, num_processes,
                                      num_cached_per_queue=num_cached, seeds=per_worker, pin_memory=pin_memory,
                                      wait_time=wait_time)

    original = trainer_module.NonDetMultiThreadedAugmenter
    trainer_module.NonDetMultiThreadedAugmenter = seeded_augmenter
    try:
        yield
    finally:
        trainer_module.NonDetMultiThreadedAugmenter = original
