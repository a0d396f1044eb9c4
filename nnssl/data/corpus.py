"""From a folder of raw CT volumes to an nnU-Net-preprocessed pretraining corpus, with nnU-Net's own code.

A corpus has no labels, so each volume gets a body mask (HU > -500, largest connected component, holes
filled) as its label map: nnU-Net's fingerprint then takes CT intensity statistics from body voxels, and its
planning, resampling and CT normalisation apply unchanged. Volumes that cannot serve (unreadable, 2D, 4D,
absurd spacing, NaN/Inf, constant, no body) are reported and skipped; the run never stops for one bad file.
"""
from __future__ import annotations

import gzip
import logging
import os
import re
import zlib
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from tqdm import tqdm

from nnssl.errors import NnsslError
from nnssl.io import atomic_path, save_json
from nnssl.paths import nnunet_planner_environment, nnunet_preprocessed, nnunet_raw

log = logging.getLogger(__name__)

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")
SPACING_RANGE_MM = (0.05, 20.0)
MIN_SIDE_VOXELS = 8
BODY_THRESHOLD_HU = -500.0
REPORT_FILENAME = "corpus_report.json"


@dataclass
class CorpusReport:
    accepted: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"{len(self.accepted)} volumes accepted, {len(self.skipped)} skipped"]
        lines += [f"  skipped {item['source']}: {item['reason']}" for item in self.skipped]
        return "\n".join(lines)


class BadVolume(Exception):
    """A raw volume that cannot enter the corpus; the message is the reason shown to the user."""


def find_volumes(raw_dir: Path) -> list[tuple[str, Path]]:
    """``(source, path)`` for every image file and every DICOM series (a folder) below ``raw_dir``."""
    sources = []
    dicom_dirs = set()
    for path in sorted(raw_dir.rglob("*")):
        if path.is_file() and path.name.lower().endswith(VOLUME_SUFFIXES):
            sources.append((str(path.relative_to(raw_dir)), path))
        elif path.is_file() and (path.suffix.lower() == ".dcm" or path.suffix == ""):
            dicom_dirs.add(path.parent)
    for folder in sorted(dicom_dirs):
        for series_id in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)) or ():
            sources.append((f"{folder.relative_to(raw_dir)}#{series_id}", folder))
    return sources


def case_id(source: str) -> str:
    """A stable nnU-Net case identifier from a path relative to the raw folder."""
    stem = source.split("#")[0]
    for suffix in VOLUME_SUFFIXES:
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    if "#" in source:  # DICOM: folder + a short series tag, so several series of one folder stay apart
        stem += "_s" + re.sub(r"[^0-9]", "", source.split("#")[1])[-8:]
    return re.sub(r"[^A-Za-z0-9-]+", "_", stem).strip("_") or "case"


def _check_gzip_complete(path: Path) -> None:
    # ITK's NIfTI reader zero-fills a truncated .nii.gz without complaint; gzip notices the missing end
    try:
        with gzip.open(path, "rb") as stream:
            while stream.read(1 << 24):
                pass
    except (EOFError, OSError, zlib.error) as err:
        raise BadVolume(f"truncated or corrupt gzip file ({err})") from None


def read_volume(source: str, path: Path) -> sitk.Image:
    if path.name.lower().endswith(".gz"):
        _check_gzip_complete(path)
    try:
        if path.is_dir():
            series_id = source.split("#")[1]
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), series_id))
            return reader.Execute()
        return sitk.ReadImage(str(path))
    except RuntimeError as err:
        first_line = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise BadVolume(f"unreadable ({first_line[:160]})") from None


def check_volume(image: sitk.Image) -> np.ndarray:
    """The voxel array (z, y, x) of a usable 3D CT volume; BadVolume says why one is not."""
    dim = image.GetDimension()
    if dim != 3:
        raise BadVolume(f"{dim}D image; a 3D volume is needed")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise BadVolume(f"{image.GetNumberOfComponentsPerPixel()} components per voxel (colour/vector image)")
    size = image.GetSize()
    if min(size) < MIN_SIDE_VOXELS:
        raise BadVolume(f"size {size} has a side below {MIN_SIDE_VOXELS} voxels (2D or a thin slab)")
    spacing = image.GetSpacing()
    low, high = SPACING_RANGE_MM
    if not all(np.isfinite(s) and low <= s <= high for s in spacing):
        raise BadVolume(f"absurd spacing {tuple(round(s, 4) for s in spacing)} mm (expected {low}-{high} mm)")
    array = sitk.GetArrayFromImage(image)
    if not np.isfinite(array).all():
        raise BadVolume("contains NaN or Inf voxels")
    if array.min() == array.max():
        raise BadVolume(f"empty: every voxel is {array.min()}")
    return array


def body_mask(array: np.ndarray) -> np.ndarray:
    """Largest connected component above -500 HU with holes filled: the corpus's stand-in label map."""
    mask = ndimage.binary_opening(array > BODY_THRESHOLD_HU, iterations=1)
    labels, count = ndimage.label(mask)
    if count == 0:
        raise BadVolume(f"no voxels above {BODY_THRESHOLD_HU:.0f} HU: not a CT volume in Hounsfield units?")
    sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, count + 1))
    largest = labels == (int(np.argmax(sizes)) + 1)
    return ndimage.binary_fill_holes(largest).astype(np.uint8)


def _write_like(array: np.ndarray, reference: sitk.Image, path: Path) -> None:
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(reference)
    with atomic_path(path) as tmp:
        # SimpleITK picks the writer from the extension, so the temporary name keeps it
        named = tmp.with_name(tmp.name + ".nii.gz")
        sitk.WriteImage(out, str(named), useCompression=True)
        os.replace(named, tmp)


def convert_volume(job: tuple[str, Path, Path]) -> dict:
    """Convert one raw volume into ``imagesTr``/``labelsTr`` of the corpus; skip it if already converted."""
    source, path, dataset_dir = job
    case = case_id(source)
    image_file = dataset_dir / "imagesTr" / f"{case}_0000.nii.gz"
    label_file = dataset_dir / "labelsTr" / f"{case}.nii.gz"
    if image_file.is_file() and label_file.is_file():
        return {"source": source, "case": case, "status": "accepted"}
    try:
        image = read_volume(source, path)
        array = check_volume(image)
        mask = body_mask(array)
    except BadVolume as reason:
        return {"source": source, "case": case, "status": "skipped", "reason": str(reason)}
    _write_like(array, image, image_file)
    _write_like(mask, image, label_file)
    return {"source": source, "case": case, "status": "accepted"}


def prepare_corpus(raw_dir: str | os.PathLike, dataset_id: int, name: str, num_processes: int = 4,
                   target_spacing: tuple[float, float, float] | None = (2.0, 2.0, 2.0),
                   preprocess: bool = True) -> CorpusReport:
    """Convert ``raw_dir`` into ``$nnUNet_raw/DatasetXXX_name`` and preprocess it with nnU-Net (3d_fullres).

    ``target_spacing`` (mm, x/y/z) overrides nnU-Net's planned spacing; the study pretrains at 2 mm isotropic
    (None keeps nnU-Net's choice). Re-running continues where a previous run stopped.
    """
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise NnsslError(f"Raw corpus folder {raw_dir} does not exist (-i).")
    if not 1 <= dataset_id <= 999:
        raise NnsslError(f"Dataset id {dataset_id} must be between 1 and 999 (-d).")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise NnsslError(f"Dataset name '{name}' may only contain letters, digits, '_' and '-' (-n).")
    raw_root, preprocessed_root = nnunet_raw(), nnunet_preprocessed()
    clash = [p.name for p in raw_root.glob(f"Dataset{dataset_id:03d}_*") if p.name != f"Dataset{dataset_id:03d}_{name}"]
    if clash:
        raise NnsslError(f"Dataset id {dataset_id} is already used by {clash[0]} in $nnUNet_raw; pick another -d.")
    sources = find_volumes(raw_dir)
    if not sources:
        raise NnsslError(f"No volumes found in {raw_dir}: expected {', '.join(VOLUME_SUFFIXES)} files or DICOM series.")
    dataset_dir = raw_root / f"Dataset{dataset_id:03d}_{name}"
    for sub in ("imagesTr", "labelsTr"):
        (dataset_dir / sub).mkdir(parents=True, exist_ok=True)

    jobs = [(source, path, dataset_dir) for source, path in sources]
    report = CorpusReport()
    with get_context("spawn").Pool(num_processes) if num_processes > 1 else _InProcess() as pool:
        for result in tqdm(pool.imap(convert_volume, jobs), total=len(jobs), desc="converting volumes"):
            (report.accepted if result["status"] == "accepted" else report.skipped).append(result)
    save_json({"accepted": report.accepted, "skipped": report.skipped}, dataset_dir / REPORT_FILENAME)
    if len(report.accepted) < 2:
        raise NnsslError(f"Only {len(report.accepted)} usable volume(s) in {raw_dir}; a corpus needs at least 2.\n"
                         f"{report.summary()}")
    _remove_stale_cases(dataset_dir, {item["case"] for item in report.accepted})
    save_json({
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, "body": 1},
        "numTraining": len(report.accepted),
        "file_ending": ".nii.gz",
        "imaging_modality": "CT",
        "name": name,
        "description": "nnssl pretraining corpus; label 1 is an automatic body mask, not an annotation.",
        "nnssl_corpus": True,
    }, dataset_dir / "dataset.json")
    if preprocess:
        _nnunet_preprocess(dataset_id, num_processes, target_spacing)
        log.info("preprocessed corpus in %s", preprocessed_root / dataset_dir.name)
    return report


def _remove_stale_cases(dataset_dir: Path, keep: set[str]) -> None:
    # a volume removed from the raw folder since an earlier run must not stay in the corpus
    for image in (dataset_dir / "imagesTr").glob("*_0000.nii.gz"):
        case = image.name[: -len("_0000.nii.gz")]
        if case not in keep:
            image.unlink()
            (dataset_dir / "labelsTr" / f"{case}.nii.gz").unlink(missing_ok=True)


def _nnunet_preprocess(dataset_id: int, num_processes: int,
                       target_spacing: tuple[float, float, float] | None) -> None:
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprints, plan_experiments,
                                                                       preprocess)

    extract_fingerprints([dataset_id], num_processes=num_processes, check_dataset_integrity=True, clean=True)
    # nnU-Net orders spacings like its arrays (z, y, x); ours is given x/y/z like SimpleITK
    spacing = None if target_spacing is None else tuple(float(s) for s in reversed(target_spacing))
    with nnunet_planner_environment():
        plan_experiments([dataset_id], overwrite_target_spacing=spacing)
    preprocess([dataset_id], configurations=("3d_fullres",), num_processes=(num_processes,))


class _InProcess:
    """``Pool``-like stand-in that maps in this process (``-np 1``: no worker start-up cost)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @staticmethod
    def imap(function, items):
        return map(function, items)
