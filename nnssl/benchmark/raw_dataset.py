"""One writing and validation path from any download to an nnU-Net v2 raw dataset.

A converter (``nnssl/benchmark/converters.py``) only lists a download's cases: for each, where its
image channels and label map come from. :func:`write_raw_dataset` does the rest for every dataset:

- checks that every listed file exists before anything is written (one error lists what is missing);
- writes ``imagesTr/<case>_<channel:04d>.nii.gz``, ``labelsTr/<case>.nii.gz``, ``imagesTs/...`` and
  ``dataset.json`` (nnU-Net's ``generate_dataset_json``, plus ``"imaging_modality": "CT"|"MRI"``);
- checks each label map: whole numbers, only the task's label values (``drop_labels`` become background),
  and the same voxel grid as the case's images;
- builds the dataset in a hidden ``.DatasetXXX_Name.partial`` folder beside the target and renames it at
  the end, so a ``DatasetXXX_Name`` folder is always complete; an interrupted conversion is continued
  case by case when the same command runs again (``.done_cases`` lists the finished cases).

NIfTI sources are copied byte for byte when nothing in them changes (AMOS files carry direction matrices
that SimpleITK rejects, so NIfTI is read with nibabel); images from other formats (DICOM, NRRD, PNG) are
built by the converter as SimpleITK images and written with SimpleITK.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Union

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from nnssl.benchmark.study import TaskSpec
from nnssl.errors import NnsslError
from nnssl.io import load_json

log = logging.getLogger(__name__)

FILE_ENDING = ".nii.gz"
DONE_FILE = ".done_cases"
SCRATCH = ".scratch"
MAX_LISTED = 10  # missing files named in one error message

# A file (NIfTI: copied; other formats SimpleITK reads, e.g. NRRD: converted) or a function that builds the image.
Source = Union[Path, Callable[[], sitk.Image]]


@dataclass(frozen=True)
class Split4D:
    """A 4D NIfTI whose last axis holds the channels (MSD BrainTumour); split by nnU-Net's ``split_4d_nifti``."""

    path: Path


@dataclass(frozen=True)
class Case:
    """One case of a download. ``label`` is None for unlabelled (test) cases, which go to ``imagesTs``."""

    case_id: str
    channels: tuple[Source, ...] | Split4D
    label: Source | None = None

    @property
    def files(self) -> list[Path]:
        """The source files this case needs (those a converter names directly)."""
        channels = [self.channels.path] if isinstance(self.channels, Split4D) else list(self.channels)
        return [s for s in (*channels, self.label) if isinstance(s, Path)]


def write_raw_dataset(task: TaskSpec, cases: Iterable[Case], out_root: Path, overwrite: bool = False,
                      extra_json: dict | None = None) -> Path:
    """Write ``out_root/DatasetXXX_Name`` for ``task`` from ``cases``; returns the dataset folder.

    An existing complete folder is left as it is (the conversion is done) unless ``overwrite``; an existing
    incomplete one is an error that says how to proceed. ``extra_json`` entries are added to dataset.json.
    """
    out_root = Path(out_root)
    final = out_root / task.dataset
    cases = list(cases)
    _check_target(task, final, overwrite)
    if final.is_dir() and not overwrite:
        log.info("%s is already converted; nothing to do (use --overwrite to convert again)", final)
        return final
    _check_sources(task, cases)
    partial = out_root / f".{task.dataset}.partial"
    done = _done_cases(partial)
    if done:
        log.info("continuing the conversion in %s (%d of %d cases done)", partial, len(done), len(cases))
    for sub in ("imagesTr", "labelsTr", "imagesTs", SCRATCH):
        (partial / sub).mkdir(parents=True, exist_ok=True)
    allowed = set(task.labels.values())
    drop = {int(v) for v in task.options.get("drop_labels", [])}
    for case in tqdm([c for c in cases if c.case_id not in done], desc=f"nnssl_convert {task.key}", unit="case"):
        _write_case(task, case, partial, allowed, drop)
        with open(partial / DONE_FILE, "a") as f:
            f.write(case.case_id + "\n")
            f.flush()
            os.fsync(f.fileno())
    num_training = sum(c.label is not None for c in cases)
    _write_dataset_json(task, partial, num_training, extra_json or {})
    shutil.rmtree(partial / SCRATCH)
    (partial / DONE_FILE).unlink()
    if not any((partial / "imagesTs").iterdir()):
        (partial / "imagesTs").rmdir()
    _replace_folder(partial, final)
    if task.expected_cases and num_training != task.expected_cases:
        log.warning("%s: converted %d labelled cases; the complete official release has %d. Check that the "
                    "download is complete.", task.key, num_training, task.expected_cases)
    log.info("wrote %s (%d training cases, %d test cases)", final, num_training, len(cases) - num_training)
    return final


def is_complete(folder: Path) -> bool:
    """True for a raw dataset folder with a dataset.json whose numTraining matches its label files."""
    dataset_json = folder / "dataset.json"
    if not dataset_json.is_file():
        return False
    try:
        expected = load_json(dataset_json)["numTraining"]
    except (ValueError, KeyError):
        return False
    return len(list((folder / "labelsTr").glob(f"*{FILE_ENDING}"))) == expected


def _check_target(task: TaskSpec, final: Path, overwrite: bool) -> None:
    others = [p.name for p in final.parent.glob(f"Dataset{task.dataset_id:03d}_*") if p.name != final.name]
    if others:
        raise NnsslError(f"Dataset id {task.dataset_id} is already used in {final.parent} by {others}; nnU-Net "
                         f"could not tell them apart from {final.name}. Move that dataset elsewhere, or convert "
                         f"into another folder with -o.")
    if final.is_dir() and not overwrite and not is_complete(final):
        raise NnsslError(f"{final} exists but is incomplete (no dataset.json, or fewer label files than its "
                         f"numTraining). Delete it, or run again with --overwrite to replace it.")


def _check_sources(task: TaskSpec, cases: list[Case]) -> None:
    if not any(c.label is not None for c in cases):
        raise NnsslError(f"No labelled cases found for {task.key}; expected layout: "
                         f"{task.source.get('layout', '?')}.")
    ids = [c.case_id for c in cases]
    if len(set(ids)) != len(ids):
        raise NnsslError(f"{task.key}: case ids are not unique: {sorted({i for i in ids if ids.count(i) > 1})}.")
    missing = [str(p) for c in cases for p in c.files if not p.is_file()]
    if missing:
        listed = "\n  ".join(missing[:MAX_LISTED])
        more = f"\n  ... and {len(missing) - MAX_LISTED} more" if len(missing) > MAX_LISTED else ""
        raise NnsslError(f"The {task.key} download is incomplete: {len(missing)} file(s) listed by it are "
                         f"missing:\n  {listed}{more}\nDownload it again from {task.source.get('url', '?')}.")


def _done_cases(partial: Path) -> set[str]:
    done_file = partial / DONE_FILE
    return set(done_file.read_text(encoding="utf-8").split()) if done_file.is_file() else set()


def _write_case(task: TaskSpec, case: Case, folder: Path, allowed: set[int], drop: set[int]) -> None:
    split = "Tr" if case.label is not None else "Ts"
    scratch = folder / SCRATCH
    images = _write_channels(case, folder / f"images{split}", scratch, len(task.channel_names))
    if case.label is None:
        return
    label_file = folder / "labelsTr" / f"{case.case_id}{FILE_ENDING}"
    _write_label(case, label_file, scratch, allowed, drop)
    _check_grid(case, images, label_file)


def _write_channels(case: Case, target: Path, scratch: Path, num_channels: int) -> list[Path]:
    names = [target / f"{case.case_id}_{i:04d}{FILE_ENDING}" for i in range(num_channels)]
    if isinstance(case.channels, Split4D):
        from nnunetv2.dataset_conversion.convert_MSD_dataset import split_4d_nifti

        with tempfile.TemporaryDirectory(dir=scratch) as tmp:
            split_4d_nifti(str(case.channels.path), tmp)
            produced = sorted(Path(tmp).glob(f"*{FILE_ENDING}"))
            if len(produced) != num_channels:
                raise NnsslError(f"{case.channels.path} holds {len(produced)} channel(s); this task has "
                                 f"{num_channels}. Is it the right dataset?")
            for path, name in zip(produced, names):
                os.replace(path, name)
        return names
    if len(case.channels) != num_channels:
        raise NnsslError(f"Case {case.case_id} has {len(case.channels)} image channel(s); this task has "
                         f"{num_channels}.")
    for source, name in zip(case.channels, names):
        _write_source(source, name, scratch)
    return names


def _write_source(source: Source, target: Path, scratch: Path) -> None:
    """Copy a NIfTI file, or convert another image file or write a built image, to ``target`` (NIfTI)."""
    if _is_nifti(source):
        _atomic_write(target, scratch, lambda tmp: shutil.copyfile(source, tmp))
    else:
        image = sitk.ReadImage(str(source)) if isinstance(source, Path) else source()
        _atomic_write(target, scratch, lambda tmp: sitk.WriteImage(image, tmp, useCompression=True))


def _is_nifti(source: Source) -> bool:
    return isinstance(source, Path) and source.name.endswith((".nii.gz", ".nii"))


def _atomic_write(target: Path, scratch: Path, write: Callable[[str], object]) -> None:
    """``write(tmp)`` into a temporary file of the same ending, then rename it to ``target``."""
    fd, tmp = tempfile.mkstemp(suffix=FILE_ENDING, dir=scratch)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_label(case: Case, target: Path, scratch: Path, allowed: set[int], drop: set[int]) -> None:
    source = case.label
    if _is_nifti(source):
        nifti = nib.load(source)
        array = np.asanyarray(nifti.dataobj)
    else:
        image = sitk.ReadImage(str(source)) if isinstance(source, Path) else source()
        array = sitk.GetArrayFromImage(image)
    where = source if isinstance(source, Path) else f"the label map built for case {case.case_id}"
    values = label_values(array, where)
    unknown = sorted(values - allowed - drop)
    if unknown:
        raise NnsslError(f"{where} contains label value(s) {unknown}; this task's labels are {sorted(allowed)}"
                         f"{f' (dropped: {sorted(drop)})' if drop else ''}. Is it the right dataset?")
    dropped = values & drop
    if dropped:
        log.info("case %s: label(s) %s set to background", case.case_id, sorted(dropped))
        array = np.where(np.isin(array, sorted(dropped)), 0, array)
    if _is_nifti(source):
        if not dropped:
            _write_source(source, target, scratch)
            return
        out_nifti = nib.Nifti1Image(array.astype(np.uint8), nifti.affine, nifti.header)
        out_nifti.set_data_dtype(np.uint8)
        _atomic_write(target, scratch, lambda tmp: nib.save(out_nifti, tmp))
        return
    out = sitk.GetImageFromArray(array.astype(np.uint8))
    out.CopyInformation(image)
    _write_source(lambda: out, target, scratch)


def label_values(array: np.ndarray, where: object) -> set[int]:
    """The distinct values of a label map; NnsslError if they are not whole numbers >= 0."""
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            raise NnsslError(f"{where} holds non-integer values; a label map must hold whole numbers.")
        array = array.astype(np.int64)
    if array.dtype.kind not in "iub":
        raise NnsslError(f"{where} has data type {array.dtype}; a label map must hold whole numbers.")
    if array.size and array.min() < 0:
        raise NnsslError(f"{where} holds negative values ({int(array.min())}); labels are >= 0.")
    counts = np.bincount(array.ravel().astype(np.int64, copy=False))
    return {int(v) for v in np.flatnonzero(counts)}


def _check_grid(case: Case, images: list[Path], label: Path) -> None:
    label_header = nib.load(label)
    for image in images:
        header = nib.load(image)
        if header.shape[:3] != label_header.shape[:3]:
            raise NnsslError(f"Case {case.case_id}: image {image.name} has {header.shape[:3]} voxels but its label "
                             f"map has {label_header.shape[:3]}; the download's image and label do not match.")
        if not np.allclose(header.affine, label_header.affine, atol=1e-3, rtol=1e-4):
            log.warning("case %s: image %s and its label map differ in spacing/origin/direction (nnU-Net uses the "
                        "image's)", case.case_id, image.name)


def _write_dataset_json(task: TaskSpec, folder: Path, num_training: int, extra: dict) -> None:
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    source = task.source
    reader_writer = task.options.get("reader_writer")
    generate_dataset_json(
        str(folder), dict(task.channel_names), dict(task.labels), num_training, FILE_ENDING,
        dataset_name=task.dataset, reference=source.get("url"), release=source.get("download"),
        description=f"{task.description}. {source.get('citation', '')}".strip(),
        overwrite_image_reader_writer=reader_writer, license=source.get("licence", "see the source"),
        converted_by=f"nnssl_convert {task.key}",
        # not "modality": nnU-Net reads that legacy key as the channel list
        imaging_modality=task.modality, **extra,
    )


def _replace_folder(partial: Path, final: Path) -> None:
    if final.exists():
        trash = final.parent / f".{final.name}.replaced"
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final, trash)
        os.replace(partial, final)
        shutil.rmtree(trash)
    else:
        os.replace(partial, final)
