"""``nnssl_align_plans``: give a fine-tuning task the pretraining corpus's plans, nnU-Net's way, and preprocess it.

nnU-Net's documented route for pretraining (``nnUNetv2_move_plans_between_datasets``, see its
``documentation/pretraining_and_finetuning.md``) moves the pretraining dataset's plans onto the fine-tuning
dataset and preprocesses the latter with them, so that both are resampled and normalised alike. For each task:

1. the corpus plans (``nnUNetPlans`` of Dataset501 by default) are moved onto the task under the identifier
   ``nnsslPlans`` with nnU-Net's own ``move_plans_between_datasets``;
2. ``3d_fullres`` keeps the corpus's target spacing (or the task's override in ``plans/benchmark.json``,
   ``"align": {"spacing": [z, y, x]}`` in nnU-Net's axis order). Channels nnU-Net normalises with
   ``CTNormalization`` take the corpus's intensity statistics (clip window and mean/std over body voxels), so
   one Hounsfield value reaches the encoder as one number in pretraining and fine-tuning. Other channels (MRI)
   keep the task's own scheme: z-score is the modality gap the study measures;
3. the patch size is planned again by nnU-Net's ``ExperimentPlanner`` for the task's median shape at that
   spacing, within its GPU memory target, then set to multiples of 32 (SwinUNETR) with no more voxels than
   nnU-Net planned, except that one side is at least 64 (SwinUNETR's deepest feature map, the patch / 32, needs
   more than one voxel: :mod:`nnssl.swin_bottleneck`);
4. nnU-Net preprocesses ``3d_fullres`` with the new plans (``nnUNetv2_preprocess -p nnsslPlans``).

The plans file records all of this under ``"nnssl_alignment"``. Train with ``nnUNetv2_train ... -p nnsslPlans``.
"""
from __future__ import annotations

import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from nnssl.errors import NnsslError
from nnssl.io import atomic_path, load_json, locked, save_json
from nnssl.paths import dataset_folder, nnunet_planner_environment, nnunet_preprocessed, nnunet_raw
from nnssl.swin_bottleneck import widen_single_voxel_bottleneck

log = logging.getLogger(__name__)

ALIGNED_PLANS = "nnsslPlans"
CORPUS_PLANS = "nnUNetPlans"  # what nnssl_prepare_corpus (nnUNetv2_plan_and_preprocess) writes for the corpus
CONFIGURATION = "3d_fullres"
ALIGNMENT_KEY = "nnssl_alignment"  # top-level record in the aligned plans file
CT_SCHEME = "CTNormalization"
SWIN_DIVISOR = 32  # SwinUNETR's input sides: patch 2 x 2^4 downsamplings


@dataclass(frozen=True)
class AlignedTask:
    dataset: str
    plans_file: Path
    record: dict[str, Any]


def align_plans(datasets: Sequence[str | int], corpus: str | int, plans_identifier: str = ALIGNED_PLANS,
                overrides: dict[int, dict[str, Any]] | None = None, num_processes: int = 4,
                preprocess: bool = True) -> list[AlignedTask]:
    """Aligned plans (and, with ``preprocess``, nnU-Net's 3d_fullres preprocessing) for every task of ``datasets``.

    ``overrides`` maps a dataset id to its ``align`` entry of the benchmark plan (``{"spacing": [z, y, x]}``).
    """
    if plans_identifier in (CORPUS_PLANS, ""):
        raise NnsslError(f"-pl {plans_identifier!r}: the aligned plans need their own identifier (default "
                         f"{ALIGNED_PLANS}); {CORPUS_PLANS} is nnU-Net's plan of the task itself.")
    preprocessed = nnunet_preprocessed()
    corpus_folder = dataset_folder(preprocessed, corpus, "nnUNet_preprocessed")
    corpus_plans_file = corpus_folder / f"{CORPUS_PLANS}.json"
    if not corpus_plans_file.is_file():
        raise NnsslError(f"The corpus {corpus_folder.name} has no plans {corpus_plans_file}. Prepare it with: "
                         f"nnssl_prepare_corpus -i <CT folder> -d {corpus} -n <name>")
    corpus_plans = load_json(corpus_plans_file, fix="re-run nnssl_prepare_corpus for the corpus.")
    if CONFIGURATION not in corpus_plans["configurations"]:
        raise NnsslError(f"{corpus_plans_file} has no '{CONFIGURATION}' configuration; re-run nnssl_prepare_corpus.")
    aligned = []
    for dataset in datasets:
        raw = dataset_folder(nnunet_raw(), dataset, "nnUNet_raw")
        if raw.name == corpus_folder.name:
            raise NnsslError(f"-d {dataset} is the corpus itself ({raw.name}); align the fine-tuning tasks.")
        dataset_id = int(raw.name[len("Dataset"):len("Dataset") + 3])
        override = (overrides or {}).get(dataset_id, {})
        aligned.append(_align_one(dataset_id, raw.name, corpus_folder.name, corpus_plans, plans_identifier,
                                  override, num_processes, preprocess))
    return aligned


def _align_one(dataset_id: int, dataset: str, corpus: str, corpus_plans: dict, identifier: str,
               override: dict[str, Any], num_processes: int, preprocess: bool) -> AlignedTask:
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints
    from nnunetv2.experiment_planning.plans_for_pretraining.move_plans_between_datasets import \
        move_plans_between_datasets
    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess as nnunet_preprocess

    folder = nnunet_preprocessed() / dataset
    if not (folder / "dataset_fingerprint.json").is_file():  # what nnUNetv2_plan_and_preprocess does first
        extract_fingerprints([dataset_id], num_processes=num_processes, check_dataset_integrity=True)
    plans_file = folder / f"{identifier}.json"
    with locked(plans_file):  # the task's plans are shared with trainers and other aligners (nnssl.io.locked)
        move_plans_between_datasets(corpus, dataset, CORPUS_PLANS, identifier)
        plans = load_json(plans_file)
        record = _retarget(plans, dataset_id, corpus, corpus_plans, override)
        save_json(plans, plans_file)
    # as nnU-Net's ExperimentPlanner.save_plans: preprocessing and training read dataset.json from here (atomic:
    # a copy cut off by a kill would leave a dataset.json that nnU-Net fails to read)
    with atomic_path(folder / "dataset.json") as copy:
        shutil.copyfile(nnunet_raw() / dataset / "dataset.json", copy)
    if preprocess:
        nnunet_preprocess([dataset_id], plans_identifier=identifier, configurations=(CONFIGURATION,),
                          num_processes=(num_processes,))
    aligned = AlignedTask(dataset, plans_file, record)
    log.info("%s", describe(aligned))
    return aligned


def _retarget(plans: dict, dataset_id: int, corpus: str, corpus_plans: dict, override: dict[str, Any]) -> dict:
    """Edit the moved corpus plans in place for the task; returns the ``nnssl_alignment`` record."""
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

    planner = ExperimentPlanner(dataset_id, plans_name=plans["plans_name"])
    fingerprint = planner.dataset_fingerprint
    channels = len(planner.dataset_json["channel_names"])
    task_schemes, task_masks = planner.determine_normalization_scheme_and_whether_mask_is_used_for_norm()
    corpus_channel = corpus_plans["foreground_intensity_properties_per_channel"]["0"]
    forward, backward = plans["transpose_forward"], plans["transpose_backward"]
    spacing = [float(s) for s in override.get("spacing", plans["configurations"][CONFIGURATION]["spacing"])]
    if len(spacing) != 3 or min(spacing) <= 0:
        raise NnsslError(f"The spacing override {spacing} for dataset {dataset_id} must be three positive numbers "
                         f"(mm, nnU-Net's z, y, x order); fix \"align\" of that task in the benchmark plan.")

    # nnU-Net's planner, as plan_experiment() calls it, for the task's median shape at the aligned spacing
    original_spacing = np.array(spacing)[backward]
    new_shapes = [np.round(np.array(s) / original_spacing * np.array(shape)).astype(int)
                  for s, shape in zip(fingerprint["spacings"], fingerprint["shapes_after_crop"])]
    median_shape = np.median(new_shapes, 0)[forward]
    voxels = float(np.prod(median_shape, dtype=np.float64) * planner.dataset_json["numTraining"])
    configuration = plans["configurations"][CONFIGURATION]
    with nnunet_planner_environment():
        unet_plan = planner.get_plans_for_configuration(spacing, median_shape, configuration["data_identifier"],
                                                        voxels, {})
    patch = swin_patch_within(unet_plan["patch_size"], median_shape)

    ct_channels = [c for c in range(channels) if task_schemes[c] == CT_SCHEME]
    schemes = [CT_SCHEME if c in ct_channels else task_schemes[c] for c in range(channels)]
    intensity = {str(c): dict(corpus_channel) if c in ct_channels
                 else fingerprint["foreground_intensity_properties_per_channel"][str(c)] for c in range(channels)}
    configuration.update({
        "spacing": spacing, "patch_size": patch, "batch_size": int(unet_plan["batch_size"]),
        "median_image_size_in_voxels": [float(s) for s in median_shape],
        "normalization_schemes": schemes,
        "use_mask_for_norm": [False if c in ct_channels else bool(task_masks[c]) for c in range(channels)],
        "architecture": unet_plan["architecture"],
    })
    plans["configurations"] = {CONFIGURATION: configuration}  # 2d/3d_lowres were planned for the corpus's shapes
    plans["foreground_intensity_properties_per_channel"] = intensity
    plans["original_median_spacing_after_transp"] = [float(s) for s in
                                                     np.median(fingerprint["spacings"], 0)[forward]]
    plans["original_median_shape_after_transp"] = [int(round(s)) for s in
                                                   np.median(fingerprint["shapes_after_crop"], 0)[forward]]
    record = {
        "corpus": corpus,
        "corpus_plans": CORPUS_PLANS,
        "spacing": spacing,
        "spacing_from": "benchmark plan override" if "spacing" in override else "corpus",
        "normalization": {str(c): {"scheme": schemes[c], "from": "corpus" if c in ct_channels else "task"}
                          for c in range(channels)},
        "nnunet_patch_size": [int(s) for s in unet_plan["patch_size"]],
        "patch_size": patch,
        "patch_rule": f"nnU-Net's ExperimentPlanner at the aligned spacing (its {planner.UNet_vram_target_GB:g} GB "
                      f"target), sides set to multiples of {SWIN_DIVISOR} with no more voxels, one side at least "
                      f"{2 * SWIN_DIVISOR}",
    }
    plans[ALIGNMENT_KEY] = record
    return record


def swin_patch_within(planned: Sequence[int], median_shape: Sequence[float], divisor: int = SWIN_DIVISOR) -> list[int]:
    """Sides in multiples of ``divisor``, each the nearest to nnU-Net's (not beyond the median shape rounded up),
    then shrunk by ``divisor`` on the side largest relative to the median shape (nnU-Net's own rule) until the
    patch has no more voxels than ``planned``. A patch of ``divisor`` on every side gets the side where the median
    shape is largest doubled, beyond ``planned`` if need be: SwinUNETR cannot train on a 1x1x1 bottleneck."""
    budget = math.prod(int(s) for s in planned)
    patch = []
    for side, median in zip(planned, median_shape):
        ceiling = max(divisor, math.ceil(median / divisor) * divisor)
        patch.append(min(ceiling, max(divisor, int(round(side / divisor)) * divisor)))
    while math.prod(patch) > budget and max(patch) > divisor:
        shrinkable = [i for i, side in enumerate(patch) if side > divisor]
        axis = max(shrinkable, key=lambda i: patch[i] / median_shape[i])
        patch[axis] -= divisor
    return widen_single_voxel_bottleneck(patch, median_shape, divisor)


def _describe(record: dict) -> str:
    schemes = ", ".join(f"channel {c}: {v['scheme']} from the {v['from']}" for c, v in record["normalization"].items())
    enlarged = ""
    if math.prod(record["patch_size"]) > math.prod(record["nnunet_patch_size"]):
        enlarged = (f"; enlarged beyond nnU-Net's voxels: SwinUNETR needs sides in multiples of {SWIN_DIVISOR} "
                    f"and one of at least {2 * SWIN_DIVISOR}")
    return (f"spacing {record['spacing']} (from the {record['spacing_from']}), {schemes}, patch "
            f"{record['patch_size']} (nnU-Net planned {record['nnunet_patch_size']}{enlarged})")


def describe(task: AlignedTask) -> str:
    """One line for the command's output."""
    return f"{task.dataset}: {_describe(task.record)}; plans {task.plans_file}"
