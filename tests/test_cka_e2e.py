"""Issue 7 end to end: nnssl_cka and nnssl_report on real tiny nnU-Net trainings.

Two trained folders: the shared ``trained_scratch`` (fold 0) and, made once here, a SwinUNETR_SimMIM_Trainer
fold 3 (one validation case, one epoch: the cheapest real training) fine-tuned from a random tiny encoder
saved as a pretraining run. The second training writes to a private ``nnUNet_results`` so other tests
never see it.
"""
import csv
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

from conftest import run_cli
from nnssl.analysis.feature_reuse import run_cka
from nnssl.checkpoints import ENCODER_FILENAME, save_encoder
from nnssl.cli.cka import main as cka_main
from nnssl.errors import NnsslError
from nnssl.io import save_json
from nnssl.networks import get_preset
from nnssl.networks.swin import build_encoder

SMALL = {"patches_per_case": 2, "device": "cpu"}  # 2 validation cases x 2 patches: the 4 HSIC needs


@pytest.fixture(scope="session")
def finetuned_simmim(ct_task, nnunet_env, tmp_path_factory):
    """Fold 3 of SwinUNETR_SimMIM_Trainer, fine-tuned from a tiny random 'simmim' encoder (pretraining run
    folder ``<tmp>/simmim/cka_run``) into a private results folder."""
    root = tmp_path_factory.mktemp("cka_models")
    run = root / "simmim" / "cka_run"
    torch.manual_seed(3)
    preset = get_preset("tiny")
    save_encoder(run / ENCODER_FILENAME, build_encoder(preset, in_channels=1),
                 {"backbone": preset.to_dict(), "in_channels": 1, "method": "simmim", "run": "cka_run", "step": 0,
                  "patch_size": list(preset.input_size)})
    save_json({"method": "simmim", "run": "cka_run"}, run / "config.json")
    results = root / "results"
    run_cli("nnUNetv2_train", ct_task.dataset_id, "3d_fullres", "3", "-tr", "SwinUNETR_SimMIM_Trainer", "-device",
            "cpu", "-pretrained_weights", run / ENCODER_FILENAME,
            env={"nnUNet_results": str(results), "nnssl_num_epochs": "1", "nnssl_iterations_per_epoch": "2"})
    return results / ct_task.dataset / "SwinUNETR_SimMIM_Trainer__nnUNetPlans__3d_fullres"


def validation_cases(ct_task, fold=0):
    return sorted(json.loads((ct_task.preprocessed / "splits_final.json").read_text(encoding="utf-8"))[fold]["val"])


def test_nnssl_cka_compares_trained_folders_and_the_encoder(trained_scratch, finetuned_simmim, ct_task, tmp_path):
    out = tmp_path / "cka"
    result = run_cli("nnssl_cka", trained_scratch, f"{finetuned_simmim}:3", "--vs-pretrained", "--patches-per-case",
                     "2", "-device", "cpu", "-o", out)
    data = json.loads((out / "cka.json").read_text(encoding="utf-8"))
    names = [(c["a"], c["b"]) for c in data["comparisons"]]
    assert names == [("scratch fold 0", "simmim fold 3"), ("simmim fold 3", "simmim encoder (cka_run)")]
    assert data["settings"]["cases"] == validation_cases(ct_task)
    planned = json.loads((trained_scratch / "plans.json").read_text(encoding="utf-8"))["configurations"]["3d_fullres"]["patch_size"]
    assert data["settings"]["num_patches"] == 4 and data["settings"]["patch_size"] == planned
    assert [p["case"] for p in data["patches"]] == [c for c in validation_cases(ct_task) for _ in range(2)]
    models = {m["name"]: m for m in data["models"]}
    assert models["simmim encoder (cka_run)"]["kind"] == "pretrained"
    assert models["simmim fold 3"]["pretrained"]["method"] == "simmim"
    both, encoder = data["comparisons"]
    assert np.array(both["cka"]).shape == (15, 15) and np.array(encoder["cka"]).shape == (15, 5)
    assert list(encoder["diagonal"]) == ["patch_embed", "stage1", "stage2", "stage3", "stage4"]
    assert encoder["encoder_unchanged"] is True  # the file still holds the weights fine-tuning started from
    assert all(-1.0 <= v <= 1.0 + 1e-9 for row in both["cka"] + encoder["cka"] for v in row)
    rows = (out / "cka.csv").read_text(encoding="utf-8").splitlines()
    assert rows[0].startswith("model_a,model_b,layer_a,layer_b,cka,kernel,pool,num_patches,batch_size")
    assert len(rows) == 1 + 15 * 15 + 15 * 5
    for name in ("cka_heatmap.png", "cka_diagonal.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "scratch fold 0 vs simmim fold 3" in result.stdout


def test_a_model_compared_with_itself_has_cka_one_on_the_same_patches(trained_scratch, tmp_path):
    result = run_cka([str(trained_scratch), f"{trained_scratch}:0"], tmp_path, layers="encoder", seed=5, **SMALL)
    (comparison,) = result["comparisons"]
    assert comparison["diagonal"] == pytest.approx({k: 1.0 for k in comparison["diagonal"]}, abs=1e-9)
    matrix = np.array(comparison["cka"])
    np.testing.assert_allclose(matrix, matrix.T, atol=1e-12)
    assert len(result["patches"]) == 4 and result["settings"]["seed"] == 5


def test_nnssl_cka_rejects_bad_folders_with_clear_errors(trained_scratch, tmp_path, monkeypatch, capsys):
    with pytest.raises(NnsslError, match="'/no/such/folder' does not exist"):
        run_cka(["/no/such/folder", str(trained_scratch)], tmp_path, **SMALL)
    with pytest.raises(NnsslError, match=r"has no fold 3 \(no fold_3/\)\. Folds present: \['0'\]"):
        run_cka([str(trained_scratch), f"{trained_scratch}:3"], tmp_path, **SMALL)
    unfinished = tmp_path / "Dataset990_SynthCT" / trained_scratch.name
    (unfinished / "fold_0").mkdir(parents=True)
    for name in ("plans.json", "dataset.json"):
        shutil.copy(trained_scratch / name, unfinished / name)
    with pytest.raises(NnsslError, match=r"No checkpoint_final.pth in .*fold_0 \(checkpoints present: none\)\. "
                                         r"The training is unfinished"):
        run_cka([str(trained_scratch), str(unfinished)], tmp_path, **SMALL)
    with pytest.raises(NnsslError, match="neither an nnU-Net trained-model folder"):
        run_cka([str(trained_scratch), str(tmp_path)], tmp_path, **SMALL)
    with pytest.raises(NnsslError, match="Give two or more model folders"):
        run_cka([str(trained_scratch)], tmp_path, **SMALL)
    with pytest.raises(NnsslError, match="record no pretrained encoder"):
        run_cka([str(trained_scratch)], tmp_path, vs_pretrained=True, **SMALL)
    empty_preprocessed = tmp_path / "preprocessed"
    (empty_preprocessed / "Dataset990_SynthCT").mkdir(parents=True)
    monkeypatch.setenv("nnUNet_preprocessed", str(empty_preprocessed))
    with pytest.raises(NnsslError, match="Dataset990_SynthCT is not preprocessed for configuration 3d_fullres.*"
                                         "Run: nnUNetv2_plan_and_preprocess"):
        run_cka([str(trained_scratch), str(trained_scratch)], tmp_path, **SMALL)
    with pytest.raises(SystemExit) as exit_info:
        cka_main(["/no/such/folder", str(trained_scratch), "-o", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "nnssl_cka: error: Model folder '/no/such/folder' does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("argument, message", [
    ({"batch_size": 3}, "--batch-size must be at least 4"),
    ({"patches_per_case": 0}, "--patches-per-case must be at least 1"),
    ({"cases": 1, "case_ids": ["a"]}, "Give --cases N or --case-ids, not both"),
    ({"cases": 0}, "--cases must be at least 1"),
    ({"pool": -1}, "--pool must be 0"),
    ({"kernel": "cosine"}, "--kernel 'cosine' is not one of"),
    ({"layers": "middle"}, "--layers 'middle' is not one of"),
    ({"checkpoint": "latest"}, "--checkpoint 'latest' is not one of"),
    ({"kernel": "rbf", "rbf_sigma": 0.0}, "--rbf-sigma must be positive"),
])
def test_run_cka_rejects_bad_arguments(argument, message, tmp_path):
    with pytest.raises(NnsslError, match=message):
        run_cka(["a", "b"], tmp_path, **argument)


def case_dice_by_hand(summary_file):
    per_case = []
    for case in json.loads(summary_file.read_text(encoding="utf-8"))["metric_per_case"]:
        values = [m["Dice"] for m in case["metrics"].values() if not math.isnan(m["Dice"])]
        if values:
            per_case.append(sum(values) / len(values))
    return per_case


def test_nnssl_report_on_real_trainings(trained_scratch, finetuned_simmim, ct_task, tmp_path):
    results = tmp_path / "results" / ct_task.dataset
    results.mkdir(parents=True)
    for folder in (trained_scratch, finetuned_simmim):
        os.symlink(folder, results / folder.name)
    out = tmp_path / "report"
    run_cli("nnssl_report", str(ct_task.dataset_id), "-o", out, env={"nnUNet_results": str(tmp_path / "results")})
    dice = {row["method"]: row for row in read_csv(out / "dice.csv")}
    assert sorted(dice) == ["scratch", "simmim"]
    for method, fold in (("scratch", trained_scratch / "fold_0"), ("simmim", finetuned_simmim / "fold_3")):
        by_hand = case_dice_by_hand(fold / "validation" / "summary.json")
        assert float(dice[method]["dice_mean"]) == pytest.approx(np.mean(by_hand), abs=1e-12)
        assert dice[method]["shot"] == "many-shot" and dice[method]["modality"] == "CT"
    by_hand = case_dice_by_hand(trained_scratch / "fold_0" / "validation" / "summary.json")  # 2 cases
    assert float(dice["scratch"]["dice_std"]) == pytest.approx(np.std(by_hand, ddof=1), abs=1e-12)
    assert dice["simmim"]["cases"] == "1" and dice["simmim"]["dice_std"] == ""  # undefined for one case
    means = {m: float(row["dice_mean"]) for m, row in dice.items()}  # tiny trainings may tie (both 0): shared rank
    best, worst = max(means, key=means.get), min(means, key=means.get)
    expected = {m: 1.5 for m in means} if means[best] == means[worst] else {best: 1.0, worst: 2.0}
    assert {m: float(row["rank"]) for m, row in dice.items()} == expected
    folds = read_csv(out / "folds.csv")  # each method lacks the other's fold: listed as missing
    assert {(r["method"], r["fold"], r["status"]) for r in folds} == {
        ("scratch", "0", "finished"), ("simmim", "3", "finished"), ("scratch", "3", "missing"),
        ("simmim", "0", "missing")}
    convergence = {row["method"]: row for row in read_csv(out / "convergence.csv")}
    logged = torch.load(trained_scratch / "fold_0" / "checkpoint_final.pth", weights_only=False)["logging"]
    assert float(convergence["scratch"]["final_pseudo_dice"]) == pytest.approx(logged["ema_fg_dice"][-1])
    assert float(convergence["scratch"]["epochs"]) == 2
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "## Dice" in report and "| Dataset990_SynthCT | scratch | 3 | many-shot | missing |" in report
    assert (out / f"convergence_{ct_task.dataset}.png").is_file() and (out / "dice.png").is_file()


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))
