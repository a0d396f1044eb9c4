"""What a linear probe reads: a task's nnU-Net-preprocessed training patches and validation cases, loaded once.

The training cases are those of a fold of ``splits_final.json`` (nnU-Net's default 5-fold split when the
file does not exist yet), or ``shots`` of them chosen exactly as ``nnssl_fewshot --shots N --seed S`` chooses
a few-shot fold's cases (:func:`nnssl.fewshot.fewshot_cases`). From each training case ``patches_per_case``
patches of the plan's patch size (rounded to what SwinUNETR accepts, as the fine-tuning trainers round it)
are cut: every second one centred on a voxel of a foreground class (nnU-Net's ``class_locations``), the
others at uniform positions, as nnU-Net oversamples foreground. The classifier is fitted on
``voxels_per_patch`` voxels of each patch (half uniform, half foreground), which costs a small fraction of
full patches and fits the same classifier. Validation cases are kept whole for sliding-window inference. Labels are nnU-Net's; ``-1`` (outside the nonzero mask) counts as background, as
in nnU-Net's training.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from nnssl.analysis.activations import CaseReader, InputSpec, cut_patch
from nnssl.errors import NnsslError
from nnssl.fewshot import SPLITS_FILENAME, fewshot_cases, load_splits
from nnssl.io import load_json
from nnssl.networks.swinunetr import swin_patch_size
from nnssl.paths import dataset_folder, nnunet_preprocessed
from nnssl.probe.options import ProbeCases

log = logging.getLogger(__name__)


@dataclass
class ProbeData:
    """A task's probe inputs in memory: training patches with labels, whole validation cases with labels."""

    dataset: str
    labels: dict[str, int]  # foreground class name -> label value (consecutive from 1)
    in_channels: int
    patch_size: tuple[int, int, int]
    train_cases: list[str]
    val_cases: list[str]
    train_images: Tensor  # (N, C, X, Y, Z) float32
    train_voxels: Tensor  # (N, V, 3) int64: the voxels of each patch the classifier is fitted on
    train_labels: Tensor  # (N, V) int64: their labels
    val_images: list[Tensor]  # (C, X, Y, Z) float32 each
    val_labels: list[Tensor]  # (X, Y, Z) uint8 each

    @property
    def num_classes(self) -> int:
        return len(self.labels) + 1


def load_probe_data(cases: ProbeCases) -> ProbeData:
    """Read the patches and validation cases ``cases`` describes; errors say which nnU-Net step is missing."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    if cases.patches_per_case < 1 or cases.voxels_per_patch < 2:
        raise NnsslError(f"--patches-per-case must be >= 1 and --voxels-per-patch >= 2; got "
                         f"{cases.patches_per_case} and {cases.voxels_per_patch}.")
    folder = dataset_folder(nnunet_preprocessed(), cases.dataset, "nnUNet_preprocessed")
    plans_file = folder / f"{cases.plans}.json"
    if not plans_file.is_file():
        raise NnsslError(f"{folder.name} has no plans '{cases.plans}' ({plans_file} is missing). Run: "
                         f"nnUNetv2_plan_and_preprocess -d {cases.dataset} -c {cases.configuration}")
    plans = PlansManager(load_json(plans_file, fix="re-run nnUNetv2_plan_and_preprocess."))
    if cases.configuration not in plans.available_configurations:
        raise NnsslError(f"Plans {plans_file} have no configuration '{cases.configuration}'; present: "
                         f"{plans.available_configurations}.")
    configuration = plans.get_configuration(cases.configuration)
    dataset_json = load_json(folder / "dataset.json")
    labels = _foreground_labels(dataset_json, folder.name)
    patch_size = tuple(swin_patch_size(list(configuration.patch_size)))
    reader = CaseReader(InputSpec(dataset=folder.name, configuration=cases.configuration,
                                  data_identifier=configuration.data_identifier, fold=str(cases.fold),
                                  patch_size=patch_size, num_channels=len(dataset_json["channel_names"])))
    train_cases, val_cases = _split(folder, cases)
    reader.check_cases(train_cases + val_cases)
    rng = np.random.default_rng(cases.seed)
    images, voxels, targets = [], [], []
    for case in train_cases:
        data, seg, _, properties = reader.dataset.load_case(case)
        data, seg = np.asarray(data[:], dtype=np.float32), _background_for_outside(np.asarray(seg[:]))
        for start in _patch_starts(data.shape[1:], patch_size, properties.get("class_locations") or {},
                                   cases.patches_per_case, rng):
            images.append(cut_patch(data, start, patch_size))
            target = cut_patch(seg.astype(np.float32), start, patch_size)[0].astype(np.int64)  # seg: (1, X, Y, Z)
            chosen = _voxels(target, cases.voxels_per_patch, rng)
            voxels.append(chosen)
            targets.append(target[tuple(chosen.T)])
    val_images, val_labels = [], []
    for case in val_cases:
        data, seg, _, _ = reader.dataset.load_case(case)
        val_images.append(torch.from_numpy(np.asarray(data[:], dtype=np.float32)))
        val_labels.append(torch.from_numpy(_background_for_outside(np.asarray(seg[:]))[0].astype(np.uint8)))
    log.info("probe data: %s fold %d, %d training case(s) -> %d patches of %s, %d validation case(s)", folder.name,
             cases.fold, len(train_cases), len(images), list(patch_size), len(val_cases))
    return ProbeData(dataset=folder.name, labels=labels, in_channels=val_images[0].shape[0],
                     patch_size=patch_size, train_cases=train_cases, val_cases=val_cases,
                     train_images=torch.from_numpy(np.stack(images)), train_voxels=torch.from_numpy(np.stack(voxels)),
                     train_labels=torch.from_numpy(np.stack(targets)),
                     val_images=val_images, val_labels=val_labels)


def _foreground_labels(dataset_json: dict, dataset: str) -> dict[str, int]:
    labels = {str(k): v for k, v in dataset_json["labels"].items() if k != "background"}
    if not all(isinstance(v, int) for v in labels.values()) or "ignore" in labels:
        raise NnsslError(f"{dataset}'s dataset.json uses regions or an ignore label ({dataset_json['labels']}); the "
                         f"linear probe needs plain labels 0..K (one class per voxel).")
    if sorted(labels.values()) != list(range(1, len(labels) + 1)):
        raise NnsslError(f"{dataset}'s dataset.json labels {dataset_json['labels']} are not consecutive from 1.")
    return dict(sorted(labels.items(), key=lambda item: item[1]))


def _background_for_outside(seg: np.ndarray) -> np.ndarray:
    """nnU-Net marks background outside the nonzero mask as -1; its training treats it as background."""
    return np.where(seg < 0, 0, seg)


def _split(folder, cases: ProbeCases) -> tuple[list[str], list[str]]:
    splits = load_splits(folder)
    if not 0 <= cases.fold < len(splits):
        raise NnsslError(f"--fold {cases.fold}: {folder / SPLITS_FILENAME} has folds 0-{len(splits) - 1}.")
    train, val = sorted(splits[cases.fold]["train"]), sorted(splits[cases.fold]["val"])
    if cases.shots is not None:
        if not 1 <= cases.shots <= len(train):
            raise NnsslError(f"--shots {cases.shots}: fold {cases.fold} of {folder.name} has {len(train)} training "
                             f"cases; choose 1-{len(train)}.")
        train = fewshot_cases(train, cases.shots, cases.fold, cases.seed)
    if not train or not val:
        raise NnsslError(f"Fold {cases.fold} of {folder.name} has {len(train)} training and {len(val)} validation "
                         f"cases; the probe needs both.")
    return train, val


def _patch_starts(shape: tuple[int, ...], patch_size: tuple[int, ...], class_locations: dict,
                  count: int, rng: np.random.Generator) -> list[tuple[int, int, int]]:
    """Lower corners of ``count`` patches: odd ones centred on a random foreground voxel (when the case has one),
    the others uniform; a side longer than the case is centred (zero padding, as nnU-Net pads)."""
    foreground = [np.asarray(v) for k, v in sorted(class_locations.items(), key=lambda kv: str(kv[0]))
                  if k != 0 and len(v)]
    starts = []
    for i in range(count):
        if i % 2 and foreground:
            voxels = foreground[rng.integers(len(foreground))]
            centre = voxels[rng.integers(len(voxels))][-3:]  # rows are (channel, x, y, z)
            wanted = [int(c) - size // 2 for c, size in zip(centre, patch_size)]
        else:
            wanted = [int(rng.integers(max(side - size, 0) + 1)) for side, size in zip(shape, patch_size)]
        starts.append(tuple(_inside(lo, side, size) for lo, side, size in zip(wanted, shape, patch_size)))
    return starts


def _voxels(target: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``(count, 3)`` voxel indices of a patch: half uniform, half among its foreground voxels (if it has any)."""
    uniform = rng.integers(target.size, size=count - count // 2)
    foreground = np.flatnonzero(target > 0)
    pool = foreground if len(foreground) else np.arange(target.size)
    chosen = np.concatenate([uniform, pool[rng.integers(len(pool), size=count // 2)]])
    return np.stack(np.unravel_index(chosen, target.shape), 1)


def _inside(lo: int, side: int, size: int) -> int:
    """``lo`` moved so the patch lies inside the case; a case shorter than the patch is centred in it."""
    return -((size - side) // 2) if side < size else min(max(lo, 0), side - size)
