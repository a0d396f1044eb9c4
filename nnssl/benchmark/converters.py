"""From each public dataset's official download layout to the cases of an nnU-Net raw dataset.

A converter reads only the layout of one download and lists its cases (:class:`Case`): which files are the
image channels and the label map, or how to build them. Writing, checking and resuming are shared
(:func:`nnssl.benchmark.raw_dataset.write_raw_dataset`). Layouts (``SOURCE_DIR`` may be the folder below or
one or two levels above it, e.g. the folder the archive was extracted into):

- ``msd`` (Task01/03/06/07): ``TaskNN_Name/{imagesTr,labelsTr,imagesTs}/*.nii.gz`` + ``dataset.json``,
  cases as listed in dataset.json (so macOS ``._*`` files are ignored); BrainTumour images are 4D and split
  into 4 channels by nnU-Net's ``split_4d_nifti``, exactly as ``nnUNetv2_convert_MSD_dataset``.
- ``btcv``: ``RawData/Training/img/img0001.nii.gz`` + ``RawData/Training/label/label0001.nii.gz``,
  ``RawData/Testing/img/img0061.nii.gz``; case ``img0001`` becomes ``BTCV_0001``.
- ``amos``: ``amos22/{imagesTr,labelsTr,imagesVa,labelsVa,imagesTs}/amos_NNNN.nii.gz`` + ``dataset.json``;
  the training and validation cases of the task's id range (< 500 CT, >= 500 MRI) become training cases
  (as nnU-Net's own AMOS conversion: AMOS does not say how its validation set is to be used).
- ``chaos``: ``Train_Sets/MR/<patient>/T2SPIR/DICOM_anon/IMG-*.dcm`` with ``T2SPIR/Ground/IMG-*.png`` of the
  same names; PNG intensities are mapped to labels by the ranges in the plan; slices are ordered by their
  position along the slice normal; patient ``1`` becomes ``CHAOS_001``.
- ``hanseg``: ``HaN-Seg/set_1/case_01/case_01_IMG_CT.nrrd`` + ``case_01_OAR_<name>.seg.nrrd`` per organ,
  merged into one label map in the plan's label order (see ``plans/benchmark.json``); ``case_01`` becomes
  ``HaNSeg_01``.
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

from nnssl.benchmark.raw_dataset import Case, Split4D, write_raw_dataset
from nnssl.benchmark.study import TaskSpec, load_study
from nnssl.errors import NnsslError
from nnssl.io import load_json
from nnssl.paths import env_dir

log = logging.getLogger(__name__)

Converter = Callable[[TaskSpec, Path], "tuple[list[Case], dict]"]
SEARCH_DEPTH = 2  # levels below SOURCE_DIR searched for the download's top folder


def convert(task: str, source_dir: str | Path, out_root: str | Path | None = None, overwrite: bool = False,
            plan: str | Path | None = None) -> Path:
    """Convert the official download of study task ``task`` in ``source_dir`` into ``out_root`` (default
    ``$nnUNet_raw``); returns the written ``DatasetXXX_Name`` folder."""
    spec = load_study(plan).task(task)
    source = Path(source_dir)
    if not source.is_dir():
        raise NnsslError(f"SOURCE_DIR {source} is not a folder. Give the folder of the extracted "
                         f"{spec.key} download ({spec.source.get('download', '')}).")
    out = Path(out_root) if out_root is not None else env_dir("nnUNet_raw")
    out.mkdir(parents=True, exist_ok=True)
    if spec.converter not in CONVERTERS:
        raise NnsslError(f"Task {spec.key} names converter '{spec.converter}'; known: {sorted(CONVERTERS)}.")
    cases, extra = CONVERTERS[spec.converter](spec, source)
    return write_raw_dataset(spec, cases, out, overwrite=overwrite, extra_json=extra)


# -- shared layout helpers ----------------------------------------------------------------------------------
def locate(source: Path, marker: str, task: TaskSpec) -> Path:
    """The folder at or below ``source`` (up to SEARCH_DEPTH levels) in which glob ``marker`` matches."""
    level: list[Path] = [source]
    for _ in range(SEARCH_DEPTH + 1):
        found = [folder for folder in level if any(folder.glob(marker))]
        if len(found) == 1:
            return found[0]
        if found:
            raise NnsslError(f"{source} holds several {task.key} downloads ({[str(f) for f in found]}); "
                             f"give one of them as SOURCE_DIR.")
        level = [sub for folder in level for sub in sorted(folder.iterdir())
                 if sub.is_dir() and not sub.name.startswith(".")]
    raise NnsslError(f"{source} does not look like the {task.key} download: no '{marker}' in it or up to "
                     f"{SEARCH_DEPTH} folder levels below. Expected layout: {task.source.get('layout', '?')}.\n"
                     f"Download: {task.source.get('download', task.source.get('url', '?'))}")


def _require_dir(path: Path, task: TaskSpec) -> Path:
    if not path.is_dir():
        raise NnsslError(f"The {task.key} download is incomplete: folder {path} is missing. Expected layout: "
                         f"{task.source.get('layout', '?')}.")
    return path


def _read_source_json(root: Path, task: TaskSpec) -> dict:
    path = root / "dataset.json"
    if not path.is_file():
        raise NnsslError(f"The {task.key} download is incomplete: {path} is missing.")
    return load_json(path, fix=f"download {task.key} again.")


def _check_source_labels(source_json: dict, task: TaskSpec, root: Path) -> None:
    """The download's dataset.json must list the task's label values (plus dropped ones): the right dataset."""
    found = {int(v) for v in source_json.get("labels", {})}
    expected = set(task.labels.values()) | {int(v) for v in task.options.get("drop_labels", [])}
    if found != expected:
        raise NnsslError(f"{root / 'dataset.json'} lists label values {sorted(found)}, but {task.key} has "
                         f"{sorted(expected)}. Is {root} the {task.key} download "
                         f"({task.source.get('download', '?')})?")


def _listed(root: Path, entries: list) -> list[tuple[Path, Path | None]]:
    """``(image, label or None)`` from dataset.json entries (dicts with image/label, or plain image paths)."""
    pairs = []
    for entry in entries:
        image, label = (entry["image"], entry.get("label")) if isinstance(entry, dict) else (entry, None)
        pairs.append((root / image, root / label if label else None))
    return pairs


def _stem(path: Path) -> str:
    return path.name[: -len(".nii.gz")] if path.name.endswith(".nii.gz") else path.stem


# -- converters -------------------------------------------------------------------------------------------
def msd_cases(task: TaskSpec, source: Path) -> tuple[list[Case], dict]:
    """Medical Segmentation Decathlon: cases as listed in the download's dataset.json."""
    root = locate(source, "imagesTr", task)
    for sub in ("imagesTr", "labelsTr"):
        _require_dir(root / sub, task)
    source_json = _read_source_json(root, task)
    _check_source_labels(source_json, task, root)
    channels = source_json.get("modality", source_json.get("channel_names", {}))
    if len(channels) != len(task.channel_names):
        raise NnsslError(f"{root / 'dataset.json'} has {len(channels)} image channel(s) {channels}; {task.key} "
                         f"has {len(task.channel_names)}. Is {root} the {task.key} download?")
    pairs = _listed(root, source_json.get("training", [])) + _listed(root, source_json.get("test", []))
    return [Case(_stem(image), Split4D(image), label) for image, label in pairs], {}


def btcv_cases(task: TaskSpec, source: Path) -> tuple[list[Case], dict]:
    """BTCV RawData: Training/img/imgNNNN.nii.gz with Training/label/labelNNNN.nii.gz; Testing/img unlabelled."""
    root = locate(source, "Training/img", task)
    images = sorted(_require_dir(root / "Training" / "img", task).glob("img*.nii.gz"))
    cases = []
    for image in images:
        number = _stem(image)[len("img"):]
        cases.append(Case(f"BTCV_{number}", (image,), root / "Training" / "label" / f"label{number}.nii.gz"))
    for image in sorted((root / "Testing" / "img").glob("img*.nii.gz")):
        cases.append(Case(f"BTCV_{_stem(image)[len('img'):]}", (image,)))
    return cases, {}


def amos_cases(task: TaskSpec, source: Path) -> tuple[list[Case], dict]:
    """AMOS22: training + validation cases (labelled) and test cases of the task's id range (CT or MRI)."""
    root = locate(source, "imagesTr", task)
    source_json = _read_source_json(root, task)
    _check_source_labels(source_json, task, root)
    low, high = task.options["amos_case_ids"]
    labelled = _listed(root, source_json.get("training", []) + source_json.get("validation", []))
    unlabelled = _listed(root, source_json.get("test", []))
    cases = []
    for image, label in labelled + [(image, None) for image, _ in unlabelled]:
        number = int(_stem(image).split("_")[-1])
        if low <= number <= high:
            cases.append(Case(_stem(image), (image,), label))
    return cases, {}


def chaos_cases(task: TaskSpec, source: Path) -> tuple[list[Case], dict]:
    """CHAOS MR (one sequence): a DICOM slice series and a PNG ground-truth slice per DICOM file."""
    sequence = task.options.get("chaos_sequence", "T2SPIR")
    root = locate(source, f"MR/*/{sequence}", task)
    ranges = {task.labels[name]: tuple(bounds) for name, bounds in task.options["png_intensity_ranges"].items()}
    cases = []
    for patient in sorted((p for p in (root / "MR").iterdir() if p.name.isdigit()), key=lambda p: int(p.name)):
        dicom_dir = _require_dir(patient / sequence / "DICOM_anon", task)
        ground_dir = _require_dir(patient / sequence / "Ground", task)
        dicoms = {p.stem: p for p in dicom_dir.glob("*.dcm")}
        pngs = {p.stem: p for p in ground_dir.glob("*.png")}
        if not dicoms:
            raise NnsslError(f"The {task.key} download is incomplete: no .dcm files in {dicom_dir}.")
        unpaired = sorted(set(dicoms) ^ set(pngs))
        if unpaired:
            raise NnsslError(f"The {task.key} download is incomplete: in {patient / sequence}, these slices have a "
                             f"DICOM file in DICOM_anon but no PNG of the same name in Ground, or the reverse: "
                             f"{unpaired[:10]}.")
        slices = tuple(dicoms[name] for name in sorted(dicoms))
        ground = tuple(pngs[name] for name in sorted(dicoms))
        cases.append(Case(f"CHAOS_{int(patient.name):03d}", (functools.partial(_dicom_volume, slices),),
                          functools.partial(_png_label_volume, slices, ground, tuple(ranges.items()))))
    return cases, {}


def hanseg_cases(task: TaskSpec, source: Path) -> tuple[list[Case], dict]:
    """HaN-Seg: one CT per case and one binary ``.seg.nrrd`` per organ at risk, merged into one label map."""
    root = locate(source, "case_*/case_*_IMG_CT.nrrd", task)
    organs = {name: value for name, value in task.labels.items() if value > 0}
    cases, missing = [], {}
    for folder in sorted(p for p in root.glob("case_*") if p.is_dir()):
        files = {name: folder / f"{folder.name}_OAR_{name}.seg.nrrd" for name in organs}
        present = {name: path for name, path in files.items() if path.is_file()}
        if not present:
            raise NnsslError(f"The {task.key} download is incomplete: no {folder.name}_OAR_<organ>.seg.nrrd files "
                             f"in {folder}.")
        extra = sorted(p.name for p in folder.glob("*_OAR_*.seg.nrrd") if p not in set(files.values()))
        if extra:
            log.warning("%s: ignoring organ files not in the plan's labels: %s", folder, extra)
        case_id = f"HaNSeg_{folder.name.split('_', 1)[1]}"
        if len(present) < len(organs):
            missing[case_id] = [name for name in organs if name not in present]  # in label order
        ct = folder / f"{folder.name}_IMG_CT.nrrd"
        oars = tuple((organs[name], path) for name, path in sorted(present.items(), key=lambda kv: organs[kv[0]]))
        cases.append(Case(case_id, (ct,), functools.partial(_merge_masks, ct, oars)))
    if missing:
        log.warning("%s: %d case(s) lack some organ files; those organs are background there (dataset.json "
                    "'missing_annotations')", task.key, len(missing))
    return cases, {"missing_annotations": missing} if missing else {}


CONVERTERS: dict[str, Converter] = {
    "msd": msd_cases, "btcv": btcv_cases, "amos": amos_cases, "chaos": chaos_cases, "hanseg": hanseg_cases,
}


# -- image builders (called while writing, one case at a time) ---------------------------------------------
@functools.lru_cache(maxsize=2)  # the image and the label map of one case need the same order
def slice_order(files: tuple[Path, ...]) -> list[int]:
    """Indices of DICOM slice files sorted by position along the slice normal (ImagePositionPatient .
    (row x column direction of ImageOrientationPatient)), the order a volume's z axis needs."""
    positions = []
    for path in files:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        try:
            position = np.array(reader.GetMetaData("0020|0032").split("\\"), dtype=float)
            orientation = np.array(reader.GetMetaData("0020|0037").split("\\"), dtype=float)
        except RuntimeError:
            raise NnsslError(f"DICOM file {path} has no ImagePositionPatient/ImageOrientationPatient; cannot "
                             f"order the slices.") from None
        positions.append(float(position @ np.cross(orientation[:3], orientation[3:])))
    return sorted(range(len(files)), key=positions.__getitem__)


@functools.lru_cache(maxsize=1)  # read once for the image and once more as the label map's grid
def _dicom_volume(slices: tuple[Path, ...]) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(slices[i]) for i in slice_order(slices)])
    return reader.Execute()


def _png_label_volume(slices: tuple[Path, ...], ground: tuple[Path, ...],
                      ranges: tuple[tuple[int, tuple[int, int]], ...]) -> sitk.Image:
    """Label map of the DICOM volume of ``slices``: PNG ``ground[i]`` belongs to DICOM ``slices[i]``."""
    order = slice_order(slices)
    stack = []
    for i in order:
        png = sitk.GetArrayFromImage(sitk.ReadImage(str(ground[i])))
        stack.append(png[..., 0] if png.ndim == 3 else png)  # RGB(A) PNGs carry the value in every channel
    intensities = np.stack(stack)
    labels = np.zeros(intensities.shape, dtype=np.uint8)
    for value, (low, high) in ranges:
        labels[(intensities > low) & (intensities <= high)] = value
    stray = int(np.count_nonzero((intensities > 0) & (labels == 0)))
    if stray:
        log.warning("%s: %d voxel(s) with PNG intensities outside every label range set to background",
                    ground[0].parent, stray)
    image = _dicom_volume(slices)
    if image.GetSize()[::-1] != labels.shape:
        raise NnsslError(f"Ground-truth PNGs in {ground[0].parent} have shape {labels.shape[1:]} but the DICOM "
                         f"slices have {image.GetSize()[1::-1]}.")
    out = sitk.GetImageFromArray(labels)
    out.CopyInformation(image)
    return out


def _merge_masks(ct: Path, organs: tuple[tuple[int, Path], ...]) -> sitk.Image:
    """One label map on the CT's voxel grid from binary organ masks, in ascending label order (a higher label
    overwrites a lower one where masks overlap). Masks on another grid are resampled (nearest neighbour)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(ct))
    reader.ReadImageInformation()
    grid = sitk.Image(reader.GetSize(), sitk.sitkUInt8)
    grid.SetSpacing(reader.GetSpacing())
    grid.SetOrigin(reader.GetOrigin())
    grid.SetDirection(reader.GetDirection())
    labels = np.zeros(reader.GetSize()[::-1], dtype=np.uint8)
    for value, path in organs:
        mask = sitk.ReadImage(str(path))
        if mask.GetNumberOfComponentsPerPixel() > 1:  # a Slicer segmentation with several layers
            mask = _any_component(mask)
        if not _same_grid(mask, grid):
            mask = sitk.Resample(mask, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, mask.GetPixelID())
        labels[sitk.GetArrayFromImage(mask) > 0] = value
    out = sitk.GetImageFromArray(labels)
    out.CopyInformation(grid)
    return out


def _any_component(image: sitk.Image) -> sitk.Image:
    array = sitk.GetArrayFromImage(image).any(axis=-1).astype(np.uint8)
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(image)
    return out


def _same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    return (a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-4)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-3)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-4))

