"""Issue 2 end to end: real nnUNetv2_plan_and_preprocess, nnUNetv2_train and nnUNetv2_predict."""
import json

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import run_cli
from nnssl.data.synthetic import LABELS


def test_scratch_training_validates_with_dice(trained_scratch):
    fold = trained_scratch / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file()
    summary = json.loads((fold / "validation" / "summary.json").read_text(encoding="utf-8"))
    assert "Dice" in summary["foreground_mean"]
    assert 0.0 <= summary["foreground_mean"]["Dice"] <= 1.0
    settings = json.loads((trained_scratch / "plans.json").read_text(encoding="utf-8"))["configurations"]["3d_fullres"]
    assert settings["nnssl"]["backbone"]["name"] == "tiny"
    assert settings["nnssl"]["num_epochs"] == 2 and settings["nnssl"]["iterations_per_epoch"] == 3
    assert all(side % 32 == 0 for side in settings["patch_size"])


def test_predict_rebuilds_the_network_without_the_knobs(trained_scratch, ct_task, tmp_path):
    out = tmp_path / "pred"
    run_cli("nnUNetv2_predict", "-i", ct_task.raw / "imagesTs", "-o", out, "-d", ct_task.dataset_id,
            "-c", "3d_fullres", "-tr", "SwinUNETR_Scratch_Trainer", "-f", "0", "-device", "cpu",
            "-npp", "1", "-nps", "1", "--disable_tta",
            env={"nnssl_backbone": None, "nnssl_num_epochs": None, "nnssl_iterations_per_epoch": None})
    for image_file in sorted((ct_task.raw / "imagesTs").glob("*.nii.gz")):
        case = image_file.name.replace("_0000.nii.gz", ".nii.gz")
        prediction = sitk.ReadImage(str(out / case))
        image = sitk.ReadImage(str(image_file))
        assert prediction.GetSize() == image.GetSize()
        assert set(np.unique(sitk.GetArrayFromImage(prediction))) <= set(LABELS.values())


# a refused training still makes its fold folder: these use their own nnUNet_results, not the shared model's

def test_unknown_backbone_is_a_clear_error(ct_task, tmp_path):
    result = run_cli("nnUNetv2_train", ct_task.dataset_id, "3d_fullres", "1", "-tr", "SwinUNETR_Scratch_Trainer",
                     "-device", "cpu", env={"nnssl_backbone": "hugee", "nnUNet_results": str(tmp_path)}, check=False)
    assert result.returncode == 2
    assert "Unknown backbone preset 'hugee'" in result.stderr and "Known presets" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_results_variable_is_a_clear_error(ct_task):
    result = run_cli("nnUNetv2_train", ct_task.dataset_id, "3d_fullres", "1", "-tr", "SwinUNETR_Scratch_Trainer",
                     "-device", "cpu", env={"nnUNet_results": None}, check=False)
    assert result.returncode == 2
    assert "nnUNet_results is not set" in result.stderr and "export nnUNet_results=" in result.stderr


@pytest.mark.parametrize("knob, value, message", [
    ("nnssl_num_epochs", "many", "nnssl_num_epochs='many' must be a positive whole number"),
    ("nnssl_lr", "-1e-3", "nnssl_lr='-1e-3' must be a positive number, e.g. nnssl_lr=3e-4"),
])
def test_bad_knob_value_is_a_clear_error(knob, value, message, ct_task, tmp_path):
    result = run_cli("nnUNetv2_train", ct_task.dataset_id, "3d_fullres", "1", "-tr", "SwinUNETR_Scratch_Trainer",
                     "-device", "cpu", env={knob: value, "nnUNet_results": str(tmp_path)}, check=False)
    assert result.returncode == 2 and message in result.stderr
