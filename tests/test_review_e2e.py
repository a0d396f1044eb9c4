"""Issue 14 end to end: nnssl_report with an nnU-Net baseline, NSD, paired statistics, CKA and pictures, on the
shared tiny scratch training plus one real baseline training (nnUNetTrainer_nnsslSchedule, 1 epoch x 2
iterations, its CNN narrowed to 8 base features as the demo narrows it, private results folder); NSD against
known answers on hand-made volumes."""
import csv
import json
import math
import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import run_cli
from nnssl.analysis.nsd import case_nsd, class_tolerances
from nnssl.analysis.pictures import shots_plot

BASELINE = "nnUNetTrainer_nnsslSchedule"


@pytest.fixture(scope="module")
def baseline_folder(ct_task, tmp_path_factory):
    results = tmp_path_factory.mktemp("baseline_results")
    run_cli("nnUNetv2_train", ct_task.dataset_id, "3d_fullres", "0", "-tr", BASELINE, "-device", "cpu",
            env={"nnUNet_results": str(results), "nnssl_num_epochs": "1", "nnssl_iterations_per_epoch": "2",
                 "nnssl_unet_base_features": "8"})
    return results / ct_task.dataset / f"{BASELINE}__nnUNetPlans__3d_fullres"


def test_baseline_cnn_narrowed_by_its_knob_is_what_predict_builds_and_later_folds_keep(baseline_folder, ct_task,
                                                                                        tmp_path):
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    planned = json.loads((ct_task.preprocessed / "nnUNetPlans.json").read_text(encoding="utf-8"))
    saved = json.loads((baseline_folder / "plans.json").read_text(encoding="utf-8"))
    arch = lambda plans: plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"]
    assert arch(planned)[0] == 32 and arch(saved) == [min(8 * 2 ** i, arch(planned)[-1])
                                                       for i in range(len(arch(planned)))]
    # nnUNetv2_predict builds the network from the model folder's plans.json, without the knob set
    predictor = nnUNetPredictor(device=torch.device("cpu"))
    predictor.initialize_from_trained_model_folder(str(baseline_folder), (0,), "checkpoint_final.pth")
    first_conv = next(m for m in predictor.network.modules() if isinstance(m, torch.nn.Conv3d))
    assert first_conv.out_channels == 8
    # another fold of the folder with another width would break the folder's ensemble: refused before training
    # (in a copy of the folder's plans.json: nnU-Net makes the fold's folder before the trainer can refuse)
    copy = tmp_path / "results" / ct_task.dataset / baseline_folder.name
    copy.mkdir(parents=True)
    shutil.copy(baseline_folder / "plans.json", copy)
    refused = run_cli("nnUNetv2_train", ct_task.dataset_id, "3d_fullres", "1", "-tr", BASELINE, "-device", "cpu",
                      env={"nnUNet_results": str(tmp_path / "results"), "nnssl_unet_base_features": "16"}, check=False)
    assert refused.returncode == 2 and "features_per_stage [8, 16," in refused.stderr + refused.stdout
    assert not list(copy.glob("fold_1/*.pth")) and json.loads((copy / "plans.json").read_text("utf-8")) == saved


def read_csv(path):
    with open(path, encoding="utf-8") as f:
        return list(csv.DictReader(f))


def results_tree(root, ct_task, *folders):
    dataset = root / ct_task.dataset
    dataset.mkdir(parents=True)
    for folder in folders:
        shutil.copytree(folder, dataset / folder.name, ignore=shutil.ignore_patterns("*.pth"),
                        copy_function=shutil.copy2)  # mtimes kept: the NSD cache keys on them
        for checkpoint in folder.glob("fold_*/checkpoint_final.pth"):  # the report reads the training log from it
            os.symlink(checkpoint, dataset / folder.name / checkpoint.parent.name / checkpoint.name)
    return root


def test_report_with_baseline_nsd_statistics_cka_and_pictures(trained_scratch, baseline_folder, ct_task, tmp_path):
    results = results_tree(tmp_path / "results", ct_task, trained_scratch, baseline_folder)
    scratch = results / ct_task.dataset / trained_scratch.name
    # a few- vs many-shot CKA result as nnssl_cka writes it (values made up; the report only reads them)
    cka = tmp_path / "cka" / "run"
    cka.mkdir(parents=True)
    layers = ["stage1", "stage2", "encoder1"]
    (cka / "cka.json").write_text(json.dumps({
        "models": [{"kind": "trained", "folder": str(scratch), "fold": 0}] * 2,
        "comparisons": [{"a": "x", "b": "y", "layers_a": layers, "layers_b": layers,
                         "cka": [[0.9, 0.5, 0.1], [0.5, 0.8, 0.2], [0.1, 0.2, 0.6]],
                         "diagonal": {"stage1": 0.9, "stage2": 0.8, "encoder1": 0.6}}]}))
    out = tmp_path / "report"
    env = {"nnUNet_results": str(results)}
    folder = f"{BASELINE}__nnUNetPlans__3d_fullres"  # the session task's own plans, not the study's
    run_cli("nnssl_report", ct_task.dataset_id, "--baselines", folder, "--cka", tmp_path / "cka", "-o", out, env=env)
    dice = {row["method"]: row for row in read_csv(out / "dice.csv")}
    assert dice[BASELINE]["family"] == "baseline" and dice[BASELINE]["rank"] == ""  # a reference, not ranked
    assert dice["scratch"]["rank"] == "1.0"
    # NSD from the saved predictions, per class, cached beside them
    cache = json.loads((scratch / "fold_0" / "validation" / "nsd.json").read_text(encoding="utf-8"))
    assert cache["tolerances_mm"] == {"1": 2.0, "2": 2.0, "3": 2.0, "4": 2.0} and len(cache["nsd"]) == 2
    per_case = [np.nanmean([v if v is not None else np.nan for v in c.values()]) for c in cache["nsd"].values()]
    assert float(dice["scratch"]["nsd_mean"]) == pytest.approx(np.nanmean(per_case))
    assert 0 <= float(dice["scratch"]["nsd_mean"]) <= 1 and dice[BASELINE]["nsd_mean"] != ""
    statistics = read_csv(out / "statistics.csv")
    assert {(r["method"], r["reference"], r["metric"], r["note"]) for r in statistics} == {
        (BASELINE, "scratch", "dice", "too few cases"), ("scratch", BASELINE, "dice", "too few cases"),
        (BASELINE, "scratch", "nsd", "too few cases"), ("scratch", BASELINE, "nsd", "too few cases")}
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "(reference)" in report and "too few cases" in report and "## Surface Dice (NSD)" in report
    assert "| Dataset990_SynthCT | scratch | many-shot vs many-shot | 1 | 0.90 | 0.80 | 0.60 |" in report
    for picture in (f"overlay_{ct_task.dataset}.png", f"cka_{ct_task.dataset}.png"):
        assert (out / picture).is_file() and f"]({picture})" in report

    # validation predictions gone (validation deleted, or never run): Dice stays, NSD says what is missing
    shutil.rmtree(results / ct_task.dataset / baseline_folder.name / "fold_0" / "validation")
    (results / ct_task.dataset / baseline_folder.name / "fold_0" / "validation").mkdir()
    shutil.copy(baseline_folder / "fold_0" / "validation" / "summary.json",
                results / ct_task.dataset / baseline_folder.name / "fold_0" / "validation")
    run_cli("nnssl_report", ct_task.dataset_id, "--baselines", folder, "-o", out, env=env)
    dice = {row["method"]: row for row in read_csv(out / "dice.csv")}
    assert dice[BASELINE]["dice_mean"] != "" and dice[BASELINE]["nsd_mean"] == ""
    missing = read_csv(out / "nsd_missing.csv")
    assert [(r["method"], r["fold"]) for r in missing] == [(BASELINE, "0")]
    assert "validation prediction" in missing[0]["reason"] and f"-tr {BASELINE}" in missing[0]["reason"] and \
        missing[0]["reason"].endswith("--val")
    assert "NSD missing" in (out / "report.md").read_text(encoding="utf-8")


def write_seg(path, array, spacing=(2.0, 2.0, 3.0)):
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))


def test_nsd_known_answers(tmp_path):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    truth = np.zeros((12, 16, 16), dtype=np.uint8)
    truth[3:9, 4:12, 4:12] = 1
    far = np.zeros_like(truth)
    far[3:9, 4:12, 4:12] = 2  # label 1 predicted as 2: label 1 missed, label 2 a false positive
    write_seg(tmp_path / "truth.nii.gz", truth)
    write_seg(tmp_path / "same.nii.gz", truth)
    write_seg(tmp_path / "far.nii.gz", far)
    tolerances = class_tolerances({"background": 0, "a": 1, "b": 2, "c": 3}, {"default": 2, "b": 3})
    assert tolerances == {1: 2.0, 2: 3.0, 3: 2.0}
    same = case_nsd(SimpleITKIO(), tmp_path / "same.nii.gz", tmp_path / "truth.nii.gz", tolerances)
    assert same[1] == 1.0 and math.isnan(same[3])  # label 3 in neither: undefined
    wrong = case_nsd(SimpleITKIO(), tmp_path / "far.nii.gz", tmp_path / "truth.nii.gz", tolerances)
    assert wrong[1] == 0.0 and wrong[2] == 0.0


def test_shots_plot_draws_baseline_dashed(tmp_path):
    rows = [{"task": "T", "method": m, "family": f, "shot": s, "dice_mean": d}
            for m, f in (("scratch", "scratch"), ("nnUNet", "baseline"))
            for s, d in (("2-shot", 0.3), ("many-shot", 0.6))]
    import matplotlib.pyplot as plt

    shown = {}
    original = plt.Axes.plot

    def record(ax, *args, **kwargs):
        shown[kwargs["label"]] = kwargs["linestyle"]
        return original(ax, *args, **kwargs)

    plt.Axes.plot = record
    try:
        shots_plot(rows, tmp_path / "shots.png")
    finally:
        plt.Axes.plot = original
    assert shown == {"scratch": "-", "nnUNet": "--"} and (tmp_path / "shots.png").is_file()
