"""nnssl_convert on tiny fakes laid out exactly like each official download (names, folders, formats).

Each fake is made here with SimpleITK/numpy; arrays are a few voxels wide with hand-set values, so every
check is a known answer: which voxel carries which label, which channel holds which image.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnssl.benchmark.converters import convert
from nnssl.benchmark.raw_dataset import DONE_FILE, label_values
from nnssl.benchmark.study import load_study
from nnssl.errors import NnsslError

from conftest import run_cli

SHAPE = (4, 6, 5)  # z, y, x


def _write(array: np.ndarray, path: Path, spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(array, isVector=False)  # 4D arrays are 4D images, as MSD's BrainTumour
    image.SetSpacing(spacing[: image.GetDimension()] + (1.0,) * (image.GetDimension() - len(spacing)))
    image.SetOrigin(origin + (0.0,) * (image.GetDimension() - len(origin)))
    sitk.WriteImage(image, str(path), useCompression=path.name.endswith(".gz"))
    return path


def _image(value: int) -> np.ndarray:
    return np.full(SHAPE, value, dtype=np.int16)


def _label(*values: int) -> np.ndarray:
    """Label map whose x column i holds values[i] (so each value's voxels are known: 4 * 6 per column)."""
    label = np.zeros(SHAPE, dtype=np.uint8)
    for i, v in enumerate(values):
        label[:, :, i] = v
    return label


def _read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _dataset_json(folder: Path) -> dict:
    return json.loads((folder / "dataset.json").read_text(encoding="utf-8"))


def _nnunet_accepts(folder: Path) -> None:
    """nnU-Net's own integrity checks (those nnUNetv2_plan_and_preprocess --verify_dataset_integrity runs in a
    process pool), run here in-process on every training case: channels, grids, label values, NaNs."""
    from nnunetv2.experiment_planning.verify_dataset_integrity import check_cases, verify_labels
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    meta = _dataset_json(folder)
    cases = get_filenames_of_train_images_and_targets(str(folder), meta)
    assert len(cases) == meta["numTraining"]
    for files in cases.values():
        reader = determine_reader_writer_from_dataset_json(meta, files["images"][0])
        assert verify_labels(files["label"], reader, sorted(meta["labels"].values()))
        assert check_cases(files["images"], files["label"], len(meta["channel_names"]), reader)


# -- fakes of the official downloads --------------------------------------------------------------------------
def fake_msd(root: Path, task: str, labels: dict[str, str], modality: dict[str, str], four_d: bool) -> Path:
    folder = root / task
    prefix = task.split("_")[1].lower()
    training = []
    for i in range(3):
        channels = len(modality)
        image = np.stack([_image(10 * i + c) for c in range(channels)]) if four_d else _image(10 * i)
        _write(image, folder / "imagesTr" / f"{prefix}_{i}.nii.gz")
        _write(_label(*range(len(labels))), folder / "labelsTr" / f"{prefix}_{i}.nii.gz")
        training.append({"image": f"./imagesTr/{prefix}_{i}.nii.gz", "label": f"./labelsTr/{prefix}_{i}.nii.gz"})
        # macOS resource forks ship inside the MSD tarballs; they are not cases
        (folder / "imagesTr" / f"._{prefix}_{i}.nii.gz").write_bytes(b"\x00\x05\x16\x07")
    test_image = np.stack([_image(99)] * len(modality)) if four_d else _image(99)
    _write(test_image, folder / "imagesTs" / f"{prefix}_9.nii.gz")
    (folder / "dataset.json").write_text(json.dumps({
        "name": task, "modality": modality, "labels": labels, "numTraining": 3, "numTest": 1,
        "training": training, "test": [f"./imagesTs/{prefix}_9.nii.gz"]}))
    return folder


def fake_btcv(root: Path) -> Path:
    raw = root / "RawData"
    for n in (1, 2):
        _write(_image(n), raw / "Training" / "img" / f"img{n:04d}.nii.gz")
        _write(_label(0, 6, 11, 13), raw / "Training" / "label" / f"label{n:04d}.nii.gz")
    _write(_image(61), raw / "Testing" / "img" / "img0061.nii.gz")
    return root


AMOS_LABELS = {str(i): name for i, name in enumerate(
    ["background", "spleen", "right kidney", "left kidney", "gall bladder", "esophagus", "liver", "stomach",
     "arota", "postcava", "pancreas", "right adrenal gland", "left adrenal gland", "duodenum", "bladder",
     "prostate/uterus"])}


def fake_amos(root: Path) -> Path:
    folder = root / "amos22"
    entries = {"training": [], "validation": [], "test": []}
    for split, number, label in (("Tr", 1, (0, 15)), ("Tr", 507, (0, 14, 13)), ("Va", 2, (0, 1)),
                                 ("Va", 580, (0, 6))):
        name = f"amos_{number:04d}.nii.gz"
        _write(_image(number), folder / f"images{split}" / name)
        _write(_label(*label), folder / f"labels{split}" / name)
        entries["training" if split == "Tr" else "validation"].append(
            {"image": f"./images{split}/{name}", "label": f"./labels{split}/{name}"})
    for number in (3, 541):
        _write(_image(number), folder / "imagesTs" / f"amos_{number:04d}.nii.gz")
        entries["test"].append({"image": f"./imagesTs/amos_{number:04d}.nii.gz"})
    (folder / "dataset.json").write_text(json.dumps({"name": "AMOS", "labels": AMOS_LABELS, **entries}))
    return root


def fake_chaos(root: Path, patients=(1, 3)) -> Path:
    """DICOM slices whose file-name order is the reverse of their position order (so ordering by name would
    be wrong), each with a PNG of the same name: slice at z-position k holds intensity 100 + k and, in PNG,
    liver (63) in column k and spleen (252) in the last column."""
    base = root / "CHAOS_Train_Sets" / "Train_Sets" / "MR"
    num_slices, rows, cols = 3, 6, 5
    for patient in patients:
        dicom_dir = base / str(patient) / "T2SPIR" / "DICOM_anon"
        ground_dir = base / str(patient) / "T2SPIR" / "Ground"
        dicom_dir.mkdir(parents=True)
        ground_dir.mkdir(parents=True)
        for k in range(num_slices):
            name = f"IMG-0002-{num_slices - k:05d}"  # higher file number = lower position
            pixels = np.full((1, rows, cols), 100 + k, dtype=np.int16)
            slice_image = sitk.GetImageFromArray(pixels)
            slice_image.SetSpacing((1.5, 1.5, 7.0))
            writer = sitk.ImageFileWriter()
            writer.KeepOriginalImageUIDOn()
            for tag, value in (("0020|0032", f"0\\0\\{7.0 * k}"), ("0020|0037", "1\\0\\0\\0\\1\\0"),
                               ("0018|0050", "7.0"), ("0008|0060", "MR"), ("0020|0013", str(num_slices - k)),
                               ("0020|000e", f"1.2.3.{patient}.{k}")):  # CHAOS slices carry differing UIDs
                slice_image.SetMetaData(tag, value)
            writer.SetFileName(str(dicom_dir / f"{name}.dcm"))
            writer.Execute(slice_image)
            png = np.zeros((rows, cols), dtype=np.uint8)
            png[:, k] = 63
            png[:, cols - 1] = 252
            sitk.WriteImage(sitk.GetImageFromArray(png), str(ground_dir / f"{name}.png"))
    return root / "CHAOS_Train_Sets"


def fake_hanseg(root: Path) -> Path:
    """Two cases: Brainstem (5) and SpinalCord (30) overlap in column 1 (SpinalCord must win); case_02's
    Brainstem mask is stored on a cropped grid (origin shifted by 2 voxels in x) and lacks SpinalCord."""
    set1 = root / "HaN-Seg" / "set_1"
    for case in ("case_01", "case_02"):
        folder = set1 / case
        _write(_image(-1000 if case == "case_01" else 40), folder / f"{case}_IMG_CT.nrrd")
        _write(np.zeros(SHAPE, np.int16), folder / f"{case}_IMG_MR_T1.nrrd")
        brainstem = np.zeros(SHAPE, np.uint8)
        brainstem[:, :, :2] = 1
        if case == "case_02":
            _write(brainstem[:, :, :3].copy(), folder / f"{case}_OAR_Brainstem.seg.nrrd", origin=(2.0, 0.0, 0.0))
        else:
            _write(brainstem, folder / f"{case}_OAR_Brainstem.seg.nrrd")
            cord = np.zeros(SHAPE, np.uint8)
            cord[:, :, 1] = 1
            _write(cord, folder / f"{case}_OAR_SpinalCord.seg.nrrd")
    return root / "HaN-Seg"


# -- known answers per dataset --------------------------------------------------------------------------------
MSD_LIVER = ("Task03_Liver", {"0": "background", "1": "liver", "2": "cancer"}, {"0": "CT"}, False)
MSD_BRAIN = ("Task01_BrainTumour", {"0": "background", "1": "edema", "2": "non-enhancing tumor",
                                    "3": "enhancing tumour"}, {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}, True)


@pytest.mark.parametrize("task, fake", [("Liver", MSD_LIVER), ("BrainTumour", MSD_BRAIN)])
def test_msd_converts_listed_cases_and_splits_4d_channels(tmp_path, task, fake):
    folder = convert(task, fake_msd(tmp_path / "download", *fake), out_root=tmp_path / "raw")
    spec = load_study().task(task)
    assert folder.name == spec.dataset
    channels = len(fake[2])
    assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == sorted(
        f"{fake[0].split('_')[1].lower()}_{i}_{c:04d}.nii.gz" for i in range(3) for c in range(channels))
    prefix = fake[0].split("_")[1].lower()
    for c in range(channels):  # channel c of case 2 holds 20 + c (4D) or 20 (3D)
        assert np.all(_read(folder / "imagesTr" / f"{prefix}_2_{c:04d}.nii.gz") == 20 + c * fake[3])
    assert len(list((folder / "imagesTs").iterdir())) == channels
    assert np.array_equal(_read(folder / "labelsTr" / f"{prefix}_1.nii.gz"), _label(*range(len(fake[1]))))
    meta = _dataset_json(folder)
    assert meta["channel_names"] == spec.channel_names and meta["numTraining"] == 3
    assert meta["imaging_modality"] == spec.modality and "modality" not in meta
    assert meta["labels"] == spec.labels and meta["file_ending"] == ".nii.gz"
    _nnunet_accepts(folder)


def test_btcv_renames_cases_and_keeps_label_values(tmp_path):
    folder = convert("BTCV", fake_btcv(tmp_path / "download"), out_root=tmp_path / "raw")
    assert sorted(p.name for p in (folder / "labelsTr").iterdir()) == ["BTCV_0001.nii.gz", "BTCV_0002.nii.gz"]
    assert np.all(_read(folder / "imagesTr" / "BTCV_0002_0000.nii.gz") == 2)
    assert [p.name for p in (folder / "imagesTs").iterdir()] == ["BTCV_0061_0000.nii.gz"]
    assert np.array_equal(_read(folder / "labelsTr" / "BTCV_0001.nii.gz"), _label(0, 6, 11, 13))
    assert _dataset_json(folder)["imaging_modality"] == "CT"


def test_amos_splits_ct_from_mri_and_drops_mri_only_absent_labels(tmp_path):
    download = fake_amos(tmp_path / "download")
    ct = convert("AMOS-CT", download, out_root=tmp_path / "raw")
    mri = convert("AMOS-MRI", download, out_root=tmp_path / "raw")
    assert sorted(p.name for p in (ct / "labelsTr").iterdir()) == ["amos_0001.nii.gz", "amos_0002.nii.gz"]
    assert sorted(p.name for p in (mri / "labelsTr").iterdir()) == ["amos_0507.nii.gz", "amos_0580.nii.gz"]
    assert [p.name for p in (ct / "imagesTs").iterdir()] == ["amos_0003_0000.nii.gz"]
    assert [p.name for p in (mri / "imagesTs").iterdir()] == ["amos_0541_0000.nii.gz"]
    assert np.array_equal(_read(ct / "labelsTr" / "amos_0001.nii.gz"), _label(0, 15))  # CT keeps 15 labels
    assert np.array_equal(_read(mri / "labelsTr" / "amos_0507.nii.gz"), _label(0, 0, 13))  # 14 -> background
    meta = _dataset_json(mri)
    assert meta["imaging_modality"] == "MRI" and len(meta["labels"]) == 14 and meta["numTraining"] == 2
    assert meta["overwrite_image_reader_writer"] == "NibabelIOWithReorient"
    _nnunet_accepts(mri)


def test_chaos_orders_slices_by_position_and_maps_png_intensities(tmp_path):
    folder = convert("CHAOS", fake_chaos(tmp_path / "download"), out_root=tmp_path / "raw")
    assert sorted(p.name for p in (folder / "labelsTr").iterdir()) == ["CHAOS_001.nii.gz", "CHAOS_003.nii.gz"]
    image = sitk.ReadImage(str(folder / "imagesTr" / "CHAOS_003_0000.nii.gz"))
    label = _read(folder / "labelsTr" / "CHAOS_003.nii.gz")
    assert image.GetSpacing() == pytest.approx((1.5, 1.5, 7.0))
    pixels = sitk.GetArrayFromImage(image)
    for z in range(3):  # z index = position order; slice k: intensity 100 + k, liver in column k
        assert np.all(pixels[z] == 100 + z)
        expected = np.zeros((6, 5), np.uint8)
        expected[:, z] = 1
        expected[:, 4] = 4
        assert np.array_equal(label[z], expected)
    assert _dataset_json(folder)["imaging_modality"] == "MRI"
    _nnunet_accepts(folder)


def test_hanseg_merges_organ_masks_in_label_order(tmp_path):
    folder = convert("HaN-Seg", fake_hanseg(tmp_path / "download"), out_root=tmp_path / "raw")
    first = _read(folder / "labelsTr" / "HaNSeg_01.nii.gz")
    assert np.all(first[:, :, 0] == 5) and np.all(first[:, :, 1] == 30) and np.all(first[:, :, 2:] == 0)
    second = _read(folder / "labelsTr" / "HaNSeg_02.nii.gz")  # cropped mask resampled: x 2..3 is Brainstem
    assert np.all(second[:, :, 2:4] == 5) and np.all(second[:, :, [0, 1, 4]] == 0)
    assert np.all(_read(folder / "imagesTr" / "HaNSeg_02_0000.nii.gz") == 40)
    meta = _dataset_json(folder)
    assert meta["missing_annotations"]["HaNSeg_02"][-1] == "SpinalCord"
    assert len(meta["missing_annotations"]["HaNSeg_02"]) == 29 and meta["labels"]["SpinalCord"] == 30
    _nnunet_accepts(folder)


# -- bad or incomplete downloads --------------------------------------------------------------------------------
def test_missing_label_file_is_named(tmp_path):
    download = fake_btcv(tmp_path / "download")
    (download / "RawData" / "Training" / "label" / "label0002.nii.gz").unlink()
    with pytest.raises(NnsslError, match=r"(?s)incomplete: 1 file.*label0002\.nii\.gz"):
        convert("BTCV", download, out_root=tmp_path / "raw")
    assert not (tmp_path / "raw" / "Dataset511_BTCV").exists()


def test_wrong_folder_names_expected_layout(tmp_path):
    (tmp_path / "download" / "something").mkdir(parents=True)
    with pytest.raises(NnsslError, match=r"(?s)does not look like the BTCV download: no 'Training/img'.*RawData"):
        convert("BTCV", tmp_path / "download", out_root=tmp_path / "raw")


def test_msd_missing_labels_folder(tmp_path):
    download = fake_msd(tmp_path / "download", *MSD_LIVER)
    for path in (download / "labelsTr").iterdir():
        path.unlink()
    (download / "labelsTr").rmdir()
    with pytest.raises(NnsslError, match=r"folder .*Task03_Liver/labelsTr is missing"):
        convert("Liver", download, out_root=tmp_path / "raw")


def test_msd_task_given_to_wrong_converter(tmp_path):
    download = fake_msd(tmp_path / "download", *MSD_LIVER)
    with pytest.raises(NnsslError, match=r"lists label values \[0, 1, 2\], but Lung has \[0, 1\]"):
        convert("Lung", download, out_root=tmp_path / "raw")


def test_chaos_png_without_dicom(tmp_path):
    download = fake_chaos(tmp_path / "download", patients=(1,))
    (download / "Train_Sets" / "MR" / "1" / "T2SPIR" / "DICOM_anon" / "IMG-0002-00002.dcm").unlink()
    with pytest.raises(NnsslError, match=r"no PNG of the same name in Ground, or the reverse: \['IMG-0002-00002'\]"):
        convert("CHAOS", download, out_root=tmp_path / "raw")


def test_hanseg_case_without_ct(tmp_path):
    download = fake_hanseg(tmp_path / "download")
    (download / "set_1" / "case_02" / "case_02_IMG_CT.nrrd").unlink()
    with pytest.raises(NnsslError, match=r"(?s)incomplete: 1 file.*case_02_IMG_CT\.nrrd"):
        convert("HaN-Seg", download, out_root=tmp_path / "raw")


def test_label_values_outside_task_are_rejected(tmp_path):
    download = fake_btcv(tmp_path / "download")
    _write(_label(0, 14), download / "RawData" / "Training" / "label" / "label0001.nii.gz")
    with pytest.raises(NnsslError, match=r"label0001\.nii\.gz contains label value\(s\) \[14\]"):
        convert("BTCV", download, out_root=tmp_path / "raw")


@pytest.mark.parametrize("array, message", [
    (np.array([0.0, 1.5]), "non-integer"), (np.array([0, -1]), "negative"), (np.array([0.0, np.nan]), "non-integer"),
])
def test_label_values_need_whole_non_negative_numbers(array, message):
    with pytest.raises(NnsslError, match=message):
        label_values(array, "x.nii.gz")


def test_unknown_task_suggests_a_name(tmp_path):
    with pytest.raises(NnsslError, match=r"Unknown task 'BTVC'.*Did you mean 'BTCV'"):
        convert("BTVC", tmp_path, out_root=tmp_path / "raw")


# -- atomic, resumable, idempotent ------------------------------------------------------------------------------
def test_interrupted_conversion_resumes_and_complete_one_is_kept(tmp_path, monkeypatch):
    import nnssl.benchmark.raw_dataset as raw_dataset

    download = fake_btcv(tmp_path / "download")
    out = tmp_path / "raw"
    written = []
    original = raw_dataset._write_case

    def crash_on_second(task, case, folder, allowed, drop):
        if len(written) == 1:
            raise KeyboardInterrupt
        original(task, case, folder, allowed, drop)
        written.append(case.case_id)

    monkeypatch.setattr(raw_dataset, "_write_case", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        convert("BTCV", download, out_root=out)
    assert not (out / "Dataset511_BTCV").exists()  # never a half-finished dataset under its real name
    assert (out / ".Dataset511_BTCV.partial" / DONE_FILE).read_text(encoding="utf-8").split() == ["BTCV_0001"]

    resumed = []
    monkeypatch.setattr(raw_dataset, "_write_case", lambda task, case, *a: (resumed.append(case.case_id),
                                                                             original(task, case, *a)))
    folder = convert("BTCV", download, out_root=out)
    assert resumed == ["BTCV_0002", "BTCV_0061"]
    assert not (out / ".Dataset511_BTCV.partial").exists()
    assert sorted(os.listdir(folder)) == ["dataset.json", "imagesTr", "imagesTs", "labelsTr"]

    resumed.clear()
    assert convert("BTCV", download, out_root=out) == folder and resumed == []  # finished: left as it is


def test_incomplete_existing_dataset_is_detected(tmp_path):
    download = fake_btcv(tmp_path / "download")
    folder = convert("BTCV", download, out_root=tmp_path / "raw")
    (folder / "labelsTr" / "BTCV_0001.nii.gz").unlink()
    with pytest.raises(NnsslError, match=r"(?s)Dataset511_BTCV exists but is incomplete.*--overwrite"):
        convert("BTCV", download, out_root=tmp_path / "raw")
    convert("BTCV", download, out_root=tmp_path / "raw", overwrite=True)
    assert len(list((folder / "labelsTr").iterdir())) == 2


def test_dataset_id_taken_by_another_dataset(tmp_path):
    (tmp_path / "raw" / "Dataset511_Other").mkdir(parents=True)
    with pytest.raises(NnsslError, match=r"Dataset id 511 is already used .*Dataset511_Other"):
        convert("BTCV", fake_btcv(tmp_path / "download"), out_root=tmp_path / "raw")


# -- the console script -----------------------------------------------------------------------------------------
def test_cli_converts_and_reports_errors_without_traceback(tmp_path):
    download = fake_btcv(tmp_path / "download")
    result = run_cli("nnssl_convert", "BTCV", download, "-o", tmp_path / "raw")
    assert result.stdout.strip().endswith("Dataset511_BTCV")
    bad = run_cli("nnssl_convert", "CHAOS", download, "-o", tmp_path / "raw", check=False)
    assert bad.returncode == 2
    assert "nnssl_convert: error:" in bad.stderr and "Traceback" not in bad.stderr
