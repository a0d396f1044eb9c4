"""The settings of a probe, in a module that imports nothing heavy, so ``nnssl_probe --help`` shows their
defaults at once (torch loads only when a probe runs)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ProbeCases:
    """Which cases of which dataset a probe reads (``--fold``, ``--shots``, ``-c``, ``-p``)."""

    dataset: str | int
    fold: int = 0
    shots: int | None = None
    configuration: str = "3d_fullres"
    plans: str = "nnUNetPlans"
    patches_per_case: int = 2
    voxels_per_patch: int = 2048
    seed: int = 0  # few-shot case choice (as nnssl_fewshot --seed) and patch positions


@dataclass(frozen=True)
class ProbeSettings:
    """How the classifier is fitted and evaluated (``nnssl_probe --steps ...``)."""

    steps: int = 200
    batch_voxels: int = 4096
    lr: float = 1e-2
    seed: int = 0
    overlap: float = 0.5
    feature_batch: int = 2  # patches per encoder forward (memory, not results)
