"""Normalized surface Dice (NSD) of nnU-Net's validation predictions, per case and class, cached per fold.

NSD (Nikolov et al. 2021, https://arxiv.org/abs/1809.04430; the second metric of MSD, AMOS and HaN-Seg) is
the fraction of both boundaries that lies within a tolerance (mm) of the other; it rewards boundary quality
where Dice rewards overlap. Computed with MONAI's ``compute_surface_dice`` (voxel spacing of the files) from
the segmentations nnU-Net writes to ``fold_K/validation/`` and the ground truth it copied to
``$nnUNet_preprocessed/<dataset>/gt_segmentations/`` (read with the dataset's nnU-Net reader).

Tolerances come from the task's ``nsd_tolerance_mm`` in the benchmark plan: one number, or label name ->
mm with an optional ``"default"`` (e.g. 2 mm for organs, 3 mm for tumours). The result of a fold is cached
in ``fold_K/validation/nsd.json`` together with the tolerances and the size and modification time of each
file it read, so a report run again reads it instead of recomputing, and recomputes after a new validation.
"""
from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from nnssl.analysis.results import case_id
from nnssl.io import load_json, save_json
from nnssl.paths import nnunet_preprocessed

log = logging.getLogger(__name__)

CACHE = "nsd.json"
DEFAULT_TOLERANCE_MM = 2.0
CACHE_VERSION = 1


class NsdMissing(Exception):
    """NSD of a fold cannot be computed; the message says why and what to run."""


def class_tolerances(labels: Mapping[str, Any], setting: float | Mapping[str, float] | None) -> dict[int, float]:
    """Foreground label value -> tolerance (mm) from a task's ``nsd_tolerance_mm`` (None: the default 2 mm).
    Region-based labels (lists of values) have no single value and are left out."""
    if isinstance(setting, Mapping):
        default = float(setting.get("default", DEFAULT_TOLERANCE_MM))
        per_name = {name: float(mm) for name, mm in setting.items() if name != "default"}
    else:
        default, per_name = float(setting) if setting is not None else DEFAULT_TOLERANCE_MM, {}
    return {int(value): per_name.get(name, default) for name, value in labels.items()
            if isinstance(value, int) and value > 0}


def fold_nsd(fold_dir: Path, dataset: str, dataset_json: dict, summary: dict,
             tolerances: Mapping[int, float], retry: str) -> dict[str, dict[int, float]]:
    """Case -> label -> NSD for every case of the fold's ``summary.json`` (NaN where a label is absent from
    both prediction and reference). Raises :class:`NsdMissing` naming what is missing; ``retry`` is the
    command that re-creates the validation predictions."""
    files = {case_id(case["reference_file"]): _files(case, fold_dir, dataset) for case in summary["metric_per_case"]}
    for case, (prediction, reference) in files.items():
        if not prediction.is_file():
            raise NsdMissing(f"validation prediction {prediction} is missing; re-create it with: {retry}")
        if not reference.is_file():
            raise NsdMissing(f"ground truth {reference} is missing; re-create it with: nnUNetv2_preprocess -d "
                             f"{dataset}")
    stamps = {case: [_stamp(p) for p in pair] for case, pair in files.items()}
    key = {"version": CACHE_VERSION, "tolerances_mm": {str(k): v for k, v in sorted(tolerances.items())},
           "files": stamps}
    cache = fold_dir / "validation" / CACHE
    if cache.is_file():
        cached = load_json(cache)
        if {k: cached.get(k) for k in key} == key:
            return {case: {int(k): _nan(v) for k, v in values.items()} for case, values in cached["nsd"].items()}
    reader = _reader(dataset_json, next(iter(files.values()))[1])
    nsd = {case: case_nsd(reader, prediction, reference, tolerances) for case, (prediction, reference) in files.items()}
    save_json({**key, "nsd": {case: {str(k): _json(v) for k, v in values.items()} for case, values in nsd.items()}},
              cache)
    return nsd


def case_nsd(reader: Any, prediction: Path, reference: Path, tolerances: Mapping[int, float]) -> dict[int, float]:
    """Label -> NSD of one case (MONAI ``compute_surface_dice``, at the reference's voxel spacing in mm)."""
    import torch
    from monai.metrics import compute_surface_dice

    predicted, _ = reader.read_seg(str(prediction))
    truth, properties = reader.read_seg(str(reference))
    labels = sorted(tolerances)
    one_hot = [torch.from_numpy(np.stack([seg[0] == label for label in labels]))[None] for seg in (predicted, truth)]
    with warnings.catch_warnings():  # MONAI warns for every class absent from a side; NaN/0 say it already
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)  # MONAI 1.5 deprecations inside its own functions
        values = compute_surface_dice(*one_hot, class_thresholds=[tolerances[k] for k in labels],
                                      include_background=True, spacing=[float(s) for s in properties["spacing"]])
    return {label: float(value) for label, value in zip(labels, values[0].tolist())}


def _files(case: dict, fold_dir: Path, dataset: str) -> tuple[Path, Path]:
    """Prediction and reference of a summary entry: the prediction in this fold's ``validation/`` (where
    nnU-Net writes it; a copied or moved results folder has its own), the reference where it was recorded, else
    in the dataset's ``gt_segmentations/``."""
    prediction = fold_dir / "validation" / Path(case["prediction_file"]).name
    reference = Path(case["reference_file"])
    if not reference.is_file():
        reference = nnunet_preprocessed() / dataset / "gt_segmentations" / reference.name
    return prediction, reference


def _reader(dataset_json: dict, example: Path) -> Any:
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    return determine_reader_writer_from_dataset_json(dataset_json, str(example), verbose=False)()


def _stamp(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def _json(value: float) -> float | None:
    return None if math.isnan(value) else value


def _nan(value: float | None) -> float:
    return math.nan if value is None else float(value)
