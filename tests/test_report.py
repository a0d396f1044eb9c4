"""Issue 7: nnssl_report on synthetic result folders laid out as nnU-Net writes them, against hand-computed numbers.

Three tasks (two CT, one MRI), three methods (scratch, simmim = MIM, dino = self-distillation; families
from a dummy registry), many-shot folds 0-1 and a 1-shot fold 5 from fewshot.json. Per-case Dice is the
mean over the labels whose Dice is defined (NaN = empty reference and prediction).
"""
import importlib
import math

import numpy as np
import pytest
import torch

from conftest import SCRATCH_MODEL
from nnssl.analysis.report import make_report
from nnssl.analysis.results import dataset_modality, method_family, shot_setting
from nnssl.analysis.summary_tables import convergence, descending_ranks
from nnssl.cli.report import main as report_main
from nnssl.errors import NnsslError
from nnssl.io import save_json
from nnssl.methods import registry
from nnssl.methods.base import SSLMethod

NAN = float("nan")
TRAINERS = {"scratch": "SwinUNETR_Scratch_Trainer", "simmim": "SwinUNETR_SimMIM_Trainer",
            "dino": "SwinUNETR_DINO_Trainer"}
DATASETS = {  # name -> dataset.json modality fields
    "Dataset801_CTa": {"channel_names": {"0": "CT"}, "imaging_modality": "CT"},
    "Dataset802_CTb": {"channel_names": {"0": "CT"}},  # modality inferred from the channel name
    "Dataset803_MRa": {"channel_names": {"0": "T2"}},
}
FEWSHOT = {"version": 1, "folds": {"5": {"base_fold": 0, "shots": 1, "seed": 0}}}
DEFAULT_CURVE = [0.1, 0.2]


def cases(*means):
    """Cases with two labels of the same Dice (case mean = that value)."""
    return [{"1": m, "2": m} for m in means]


# dataset -> method -> fold -> per-case label Dice (list of dicts), or a status string
RESULTS = {
    "Dataset801_CTa": {
        "simmim": {"0": [{"1": 0.7, "2": 0.9}, {"1": 0.6, "2": NAN}],  # case means 0.8, 0.6
                   "1": [{"1": 0.7, "2": 0.7}, {"1": NAN, "2": NAN}, {"1": 0.5, "2": 0.5}],  # 0.7, skipped, 0.5
                   "5": cases(0.4, 0.2)},
        "dino": {"0": cases(0.6, 0.6), "1": cases(0.6, 0.6), "5": cases(0.5, 0.5)},
        "scratch": {"0": cases(0.5, 0.3), "1": "unfinished"},
    },
    "Dataset802_CTb": {
        "simmim": {"0": cases(0.5, 0.5), "1": cases(0.5, 0.5), "5": cases(0.4, 0.4)},
        "dino": {"0": cases(0.5, 0.5), "1": cases(0.5, 0.5), "5": cases(0.2, 0.2)},
        "scratch": {"0": cases(0.2, 0.2), "1": "not validated"},
    },
    "Dataset803_MRa": {
        "simmim": {"0": cases(0.3, 0.3), "1": cases(0.3, 0.3)},
        "dino": {"0": cases(0.6, 0.6), "1": cases(0.6, 0.6)},
        "scratch": {"0": cases(0.45, 0.45), "1": cases(0.45, 0.45)},
    },
}
CURVES = {("Dataset801_CTa", "simmim", "0"): [0.2, 0.5, 0.74, 0.77, 0.8],  # 90% of 0.8 at epoch 3, 95% at 4
          ("Dataset801_CTa", "simmim", "1"): [0.4, 0.8, 0.8, 0.8, 0.8]}  # both at epoch 2


def summary_json(label_dice: list[dict]) -> dict:
    """nnU-Net's validation/summary.json for these per-case label Dice values."""
    per_case = [{"metrics": {label: {"Dice": d, "IoU": d, "FN": 0, "FP": 0, "TN": 0, "TP": 0, "n_pred": 0, "n_ref": 0}
                             for label, d in case.items()},
                 "prediction_file": f"/validation/case_{i}.nii.gz", "reference_file": f"/gt/case_{i}.nii.gz"}
                for i, case in enumerate(label_dice)]
    means = {label: {"Dice": float(np.nanmean([c[label] for c in label_dice]))} for label in label_dice[0]}
    return {"foreground_mean": {"Dice": float(np.mean([m["Dice"] for m in means.values()]))}, "mean": means,
            "metric_per_case": per_case}


def write_fold(model, dataset, trainer, fold, content, curve):
    fold_dir = model / f"fold_{fold}"
    (fold_dir / "validation").mkdir(parents=True)
    (fold_dir / "training_log_2026_1_1_00_00_00.txt").write_text("nnU-Net training log\n")
    logging = {"mean_fg_dice": curve, "ema_fg_dice": curve, "dice_per_class_or_region": [[v] for v in curve],
               "train_losses": [1.0 - v for v in curve], "val_losses": [1.1 - v for v in curve],
               "lrs": [1e-4] * len(curve), "epoch_start_timestamps": list(range(len(curve))),
               "epoch_end_timestamps": list(range(1, len(curve) + 1))}
    checkpoint = {"network_weights": {}, "optimizer_state": {}, "grad_scaler_state": None, "logging": logging,
                  "_best_ema": max(curve), "current_epoch": len(curve), "trainer_name": trainer,
                  "init_args": {"plans": {}, "configuration": "3d_fullres", "fold": int(fold), "dataset_json": {}},
                  "inference_allowed_mirroring_axes": (0, 1, 2)}
    if content == "unfinished":
        torch.save({**checkpoint, "current_epoch": 50}, fold_dir / "checkpoint_latest.pth")
        return
    torch.save(checkpoint, fold_dir / "checkpoint_final.pth")
    torch.save(checkpoint, fold_dir / "checkpoint_best.pth")
    if content != "not validated":
        save_json(summary_json(content), fold_dir / "validation" / "summary.json")


def write_results(results, preprocessed):
    for dataset, methods in RESULTS.items():
        dataset_json = {**DATASETS[dataset], "labels": {"background": 0, "a": 1, "b": 2}, "numTraining": 10,
                        "file_ending": ".nii.gz"}
        (preprocessed / dataset).mkdir(parents=True)
        if dataset != "Dataset803_MRa":
            save_json(FEWSHOT, preprocessed / dataset / "fewshot.json")
            (preprocessed / dataset / ".splits_final.json.lock").touch()
        for method, folds in methods.items():
            model = results / dataset / f"{TRAINERS[method]}__nnUNetPlans__3d_fullres"
            model.mkdir(parents=True)
            settings = {"backbone": {"name": "tiny"}, "trainer": TRAINERS[method],
                        "pretrained": None if method == "scratch" else {"method": method, "path": "/x"}}
            save_json({"dataset_name": dataset, "plans_name": "nnUNetPlans",
                       "configurations": {"3d_fullres": {"patch_size": [32, 64, 96], "nnssl": settings}}},
                      model / "plans.json")
            save_json(dataset_json, model / "dataset.json")
            (model / ".plans.json.lock").touch()  # as nnssl.io.locked leaves them: not data
            for fold, content in folds.items():
                write_fold(model, dataset, TRAINERS[method], fold, content,
                           CURVES.get((dataset, method, fold), DEFAULT_CURVE))
    # a plain nnU-Net model next to ours is not part of the report
    other = results / "Dataset801_CTa" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    (other / "fold_0").mkdir(parents=True)
    save_json({"configurations": {"3d_fullres": {}}}, other / "plans.json")


def use_dummy_registry(monkeypatch):
    """Only two registered methods, whatever methods exist while the tests run."""
    # the trainer module builds its trainer classes from the registry on first import and stays imported:
    # built from the dummy registry, later tests in this process would lose every other method's trainer
    importlib.import_module("nnssl_trainers.swinunetr")
    monkeypatch.setattr(registry, "METHODS", {})
    monkeypatch.setattr(registry, "_import_method_modules", lambda: None)
    for name, family in (("simmim", "mim"), ("dino", "self-distillation")):
        registry.register_method(name, trainer=TRAINERS[name])(type(f"Dummy_{name}", (SSLMethod,), {"family": family}))


@pytest.fixture
def dummy_registry(monkeypatch):
    use_dummy_registry(monkeypatch)


def use_results(monkeypatch, root):
    write_results(root / "results", root / "preprocessed")
    monkeypatch.setenv("nnUNet_results", str(root / "results"))
    monkeypatch.setenv("nnUNet_preprocessed", str(root / "preprocessed"))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """The report of the synthetic results, made once: (tables, output folder)."""
    root = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as monkeypatch:
        use_dummy_registry(monkeypatch)
        use_results(monkeypatch, root)
        return make_report(output=root / "report"), root / "report"


def row(table, **match):
    (found,) = [r for r in table if all(r[k] == v for k, v in match.items())]
    return found


def test_dice_mean_and_std_over_folds_and_cases(report):
    tables, _ = report
    simmim = row(tables["dice"], task="Dataset801_CTa", method="simmim", shot="many-shot")
    assert simmim["cases"] == 4 and simmim["folds"] == 2  # the case with no defined Dice is left out
    assert simmim["dice_mean"] == pytest.approx(0.65)  # (0.8 + 0.6 + 0.7 + 0.5) / 4
    assert simmim["dice_std"] == pytest.approx(math.sqrt(0.05 / 3))  # deviations 0.15, 0.05, 0.05, 0.15
    assert simmim["dice_fold_std"] == pytest.approx(math.sqrt(0.005))  # fold means 0.7 and 0.6
    assert simmim["family"] == "mim" and simmim["modality"] == "CT"
    scratch = row(tables["dice"], task="Dataset801_CTa", method="scratch", shot="many-shot")
    assert scratch["folds"] == 1 and scratch["dice_mean"] == pytest.approx(0.4)  # fold 1 is unfinished
    assert math.isnan(scratch["dice_fold_std"])
    one_shot = row(tables["dice"], task="Dataset801_CTa", method="simmim", shot="1-shot")
    assert one_shot["dice_mean"] == pytest.approx(0.3)
    assert row(tables["dice"], task="Dataset802_CTb", method="dino", shot="many-shot")["modality"] == "CT"
    assert row(tables["dice"], task="Dataset803_MRa", method="dino", shot="many-shot")["modality"] == "MRI"
    assert not [r for r in tables["dice"] if r["method"] not in TRAINERS]  # the plain nnUNetTrainer is ignored


def test_ranks_per_task_and_average_rank(report):
    tables, _ = report
    ranks = {(r["task"], r["method"], r["shot"]): r["rank"] for r in tables["dice"]}
    assert ranks[("Dataset801_CTa", "simmim", "many-shot")] == 1.0
    assert ranks[("Dataset801_CTa", "dino", "many-shot")] == 2.0
    assert ranks[("Dataset801_CTa", "scratch", "many-shot")] == 3.0
    assert ranks[("Dataset802_CTb", "simmim", "many-shot")] == ranks[("Dataset802_CTb", "dino", "many-shot")] == 1.5
    assert ranks[("Dataset801_CTa", "dino", "1-shot")] == 1.0
    average = {(r["method"], r["shot"]): r["average_rank"] for r in tables["ranks"]}
    assert average[("simmim", "many-shot")] == pytest.approx((1 + 1.5 + 3) / 3)
    assert average[("dino", "many-shot")] == pytest.approx((2 + 1.5 + 1) / 3)
    assert average[("scratch", "many-shot")] == pytest.approx((3 + 3 + 2) / 3)
    assert average[("simmim", "1-shot")] == average[("dino", "1-shot")] == pytest.approx(1.5)
    assert average[("simmim", "all")] == pytest.approx((1 + 1.5 + 3 + 2 + 1) / 5)


def test_descending_ranks_share_ties():
    assert descending_ranks([0.5, 0.9, 0.5, 0.1]) == [2.5, 1.0, 2.5, 4.0]
    assert descending_ranks([0.3, 0.3, 0.3]) == [2.0, 2.0, 2.0]


def test_few_shot_gap(report):
    tables, _ = report
    gap = row(tables["gap"], task="Dataset801_CTa", method="simmim", shot="1-shot")
    assert gap["gap"] == pytest.approx(0.65 - 0.3) and gap["relative_gap"] == pytest.approx(0.35 / 0.65)
    assert row(tables["gap"], task="Dataset802_CTb", method="dino", shot="1-shot")["gap"] == pytest.approx(0.3)
    assert len(tables["gap"]) == 4  # 2 CT tasks x 2 methods; scratch has no 1-shot fold


def test_convergence_measures(report):
    assert convergence([0.2, 0.5, 0.74, 0.77, 0.8]) == pytest.approx(
        {"final_pseudo_dice": 0.8, "auc": 3.01 / 5, "epochs_to_90": 3.0, "epochs_to_95": 4.0})
    assert math.isnan(convergence([0.0, 0.0])["epochs_to_90"])  # no progress: undefined, not epoch 1
    tables, _ = report
    simmim = row(tables["convergence"], task="Dataset801_CTa", method="simmim", shot="many-shot")
    assert simmim["epochs_to_90"] == pytest.approx(2.5) and simmim["epochs_to_95"] == pytest.approx(3.0)
    assert simmim["auc"] == pytest.approx((3.01 / 5 + 3.6 / 5) / 2)
    assert simmim["final_val_loss"] == pytest.approx(0.3) and simmim["epochs"] == 5


def test_ct_versus_mri_and_families(report):
    tables, _ = report
    simmim = row(tables["modality"], method="simmim", shot="many-shot")
    assert simmim["CT_tasks"] == 2 and simmim["MRI_tasks"] == 1
    assert simmim["CT_dice"] == pytest.approx((0.65 + 0.5) / 2) and simmim["MRI_dice"] == pytest.approx(0.3)
    assert simmim["MRI_minus_CT"] == pytest.approx(0.3 - 0.575)
    assert simmim["CT_rank"] == pytest.approx(1.25) and simmim["MRI_rank"] == 3.0
    families = {(r["family"], r["shot"], r["modality"]): r for r in tables["families"]}
    assert families[("mim", "many-shot", "all")]["dice_mean"] == pytest.approx((0.65 + 0.5 + 0.3) / 3)
    assert families[("self-distillation", "many-shot", "MRI")]["dice_mean"] == pytest.approx(0.6)
    assert families[("scratch", "many-shot", "CT")]["average_rank"] == pytest.approx(3.0)


def test_missing_and_unfinished_runs_are_listed(report):
    tables, out = report
    problems = {(r["task"], r["method"], r["fold"]): r for r in tables["problems"]}
    assert set(problems) == {("Dataset801_CTa", "scratch", "1"), ("Dataset801_CTa", "scratch", "5"),
                             ("Dataset802_CTb", "scratch", "1"), ("Dataset802_CTb", "scratch", "5")}
    assert problems[("Dataset801_CTa", "scratch", "1")]["status"] == "unfinished"
    assert "after epoch 50" in problems[("Dataset801_CTa", "scratch", "1")]["detail"]
    assert problems[("Dataset802_CTb", "scratch", "1")]["status"] == "not validated"
    assert "--val" in problems[("Dataset802_CTb", "scratch", "1")]["detail"]
    assert problems[("Dataset801_CTa", "scratch", "5")]["status"] == "missing"
    assert problems[("Dataset801_CTa", "scratch", "5")]["shot"] == "1-shot"
    markdown = (out / "report.md").read_text(encoding="utf-8")
    assert "| simmim | mim | 0.650 ± 0.129 (1) | 0.500 ± 0.000 (1.5) | 0.300 ± 0.000 (3) | 1.83 |" in markdown
    assert "unfinished" in markdown and "not validated" in markdown and "missing" in markdown
    for name in ("dice", "folds", "ranks", "gap", "convergence", "modality", "families", "problems"):
        assert (out / f"{name}.csv").is_file()
    for name in ("dice.png", "gap.png", "modality.png", "convergence_Dataset801_CTa.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


def test_report_can_be_limited_to_datasets(tmp_path, monkeypatch, dummy_registry):
    use_results(monkeypatch, tmp_path)
    tables = make_report(datasets=["803"], output=tmp_path / "out")
    assert {r["task"] for r in tables["dice"]} == {"Dataset803_MRa"}


def test_modality_shot_setting_and_family_lookups(dummy_registry):
    assert dataset_modality({"imaging_modality": "MRI", "channel_names": {"0": "CT"}}) == "MRI"
    assert dataset_modality({"channel_names": {"0": "ct"}}) == "CT"
    assert dataset_modality({"channel_names": {"0": "T1", "1": "FLAIR"}}) == "MRI"
    fewshot = FEWSHOT["folds"]
    assert [shot_setting(f, fewshot) for f in ("0", "4", "all", "5", "9")] == [
        "many-shot", "many-shot", "many-shot", "1-shot", "unknown"]
    assert method_family("simmim") == "mim" and method_family("dino") == "self-distillation"
    assert method_family("scratch") == "scratch" and method_family("not_registered_yet") == "unknown"


def test_report_rejects_bad_input(tmp_path, monkeypatch, capsys, dummy_registry):
    monkeypatch.delenv("nnUNet_results", raising=False)
    with pytest.raises(NnsslError, match="nnUNet_results is not set"):
        make_report(output=tmp_path / "out")
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "nowhere"))
    with pytest.raises(NnsslError, match=r"\$nnUNet_results \(.*nowhere\) does not exist"):
        make_report(output=tmp_path / "out")
    results = tmp_path / "results"
    (results / "Dataset801_CTa" / "nnUNetTrainer__nnUNetPlans__3d_fullres" / "fold_0").mkdir(parents=True)
    monkeypatch.setenv("nnUNet_results", str(results))
    with pytest.raises(NnsslError, match="No nnssl SwinUNETR trainings found in"):
        make_report(output=tmp_path / "out")
    with pytest.raises(NnsslError, match=r"No dataset '999' in \$nnUNet_results"):
        make_report(datasets=["999"], output=tmp_path / "out")
    use_results(monkeypatch, tmp_path / "damaged")
    (tmp_path / "damaged" / "preprocessed" / "Dataset801_CTa" / "fewshot.json").write_text("{not json")
    with pytest.raises(NnsslError, match="fewshot.json is damaged"):
        make_report(output=tmp_path / "out")
    with pytest.raises(SystemExit) as exit_info:
        report_main(["999", "-o", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "nnssl_report: error: No dataset '999'" in capsys.readouterr().err


def test_unreadable_checkpoints_are_skipped_with_a_note(tmp_path, monkeypatch, dummy_registry):
    use_results(monkeypatch, tmp_path)
    results = tmp_path / "results" / "Dataset801_CTa"
    final = results / "SwinUNETR_DINO_Trainer__nnUNetPlans__3d_fullres" / "fold_0" / "checkpoint_final.pth"
    final.write_bytes(final.read_bytes()[:200])  # truncated by a kill
    latest = results / SCRATCH_MODEL / "fold_1" / "checkpoint_latest.pth"
    latest.write_text("not a torch file")  # foreign
    tables = make_report(datasets=["801"], output=tmp_path / "out")
    folds = {(r["method"], r["fold"]): r for r in tables["folds"]}
    assert folds[("dino", "0")]["status"] == "finished" and folds[("dino", "0")]["epochs"] is None
    assert folds[("dino", "0")]["dice_mean"] == pytest.approx(0.6)  # summary.json still counts
    assert "checkpoint_latest.pth cannot be read: delete it first" in folds[("scratch", "1")]["detail"]
    notes = (tmp_path / "out" / "report.md").read_text(encoding="utf-8").split("## Notes")[1]
    for path in (final, latest):
        assert f"- {path} is not a readable nnU-Net checkpoint (" in notes


def _seed_folder(results, trainer, plans, folds, seed=None, nnssl=True):
    """A model folder trained on ``plans`` (a seed variant of nnsslPlans when ``seed`` is given)."""
    model = results / "Dataset804_Seeds" / f"{trainer}__{plans}__3d_fullres"
    model.mkdir(parents=True)
    record = {"nnssl_variant": {"of": "nnsslPlans", "name": f"seed{seed}", "knobs": {"nnssl_seed": str(seed)}}} \
        if seed else {}
    settings = {"nnssl": {"backbone": {"name": "tiny"}, "trainer": trainer, "pretrained": None}} if nnssl else {}
    save_json({"dataset_name": "Dataset804_Seeds", "plans_name": plans, **record,
               "configurations": {"3d_fullres": {"patch_size": [32, 32, 32], **settings}}}, model / "plans.json")
    save_json({**DATASETS["Dataset801_CTa"], "labels": {"background": 0, "a": 1, "b": 2}, "file_ending": ".nii.gz"},
              model / "dataset.json")
    for fold, means in folds.items():
        write_fold(model, "Dataset804_Seeds", trainer, fold, cases(*means), DEFAULT_CURVE)


def test_seed_repeats_are_pooled_and_their_noise_reported(tmp_path, monkeypatch, dummy_registry):
    """simmim and the nnU-Net baseline fine-tuned with seeds 0 and 1 (seed 1 in nnsslPlans_seed1), dino with seed 0."""
    results = tmp_path / "results"
    simmim, baseline = TRAINERS["simmim"], "nnUNetTrainer"
    _seed_folder(results, simmim, "nnsslPlans", {"0": (0.8, 0.6), "1": (0.6, 0.4)})  # fold means 0.7, 0.5
    _seed_folder(results, simmim, "nnsslPlans_seed1", {"0": (0.6, 0.6), "1": (0.4, 0.4)}, seed=1)  # 0.6, 0.4
    _seed_folder(results, TRAINERS["dino"], "nnsslPlans", {"0": (0.5, 0.5), "1": (0.3, 0.3)})
    _seed_folder(results, baseline, "nnsslPlans", {"0": (0.5, 0.5), "1": (0.5, 0.5)}, nnssl=False)
    _seed_folder(results, baseline, "nnsslPlans_seed1", {"0": (0.3, 0.3), "1": (0.3, 0.3)}, seed=1, nnssl=False)
    monkeypatch.setenv("nnUNet_results", str(results))
    (tmp_path / "preprocessed" / "Dataset804_Seeds").mkdir(parents=True)  # no fewshot.json: many-shot only
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    tables = make_report(output=tmp_path / "out", baselines=["nnUNetTrainer"])
    pooled = row(tables["dice"], method="simmim", shot="many-shot")  # one row: the seed variant is simmim too
    assert (pooled["folds"], pooled["seeds"], pooled["cases"], pooled["family"]) == (2, 2, 8, "mim")
    assert pooled["dice_mean"] == pytest.approx(0.55)  # 4.4 / 8 cases
    assert pooled["dice_fold_std"] == pytest.approx(math.sqrt(0.02))  # fold means over seeds: 0.65 and 0.45
    curves = row(tables["convergence"], method="simmim", shot="many-shot")  # averaged over 2 folds x 2 seeds
    assert (curves["folds"], curves["seeds"]) == (2, 2)
    noise = row(tables["seed_noise"], method="simmim")
    assert noise["seed_dice"] == "0.600 0.500" and noise["seed_std"] == pytest.approx(math.sqrt(0.005))
    assert noise["methods_std"] == pytest.approx(0.15 / math.sqrt(2))  # ranked methods: simmim 0.55, dino 0.4
    assert noise["seed_to_methods"] == pytest.approx(2 / 3)
    assert row(tables["seed_noise"], method="nnUNetTrainer")["seed_std"] == pytest.approx(math.sqrt(0.02))
    assert not [r for r in tables["seed_noise"] if r["method"] == "dino"]  # one seed: no seed noise
    # per case the mean over the seeds of its fold: simmim 0.7 0.6 0.5 0.4, the baseline 0.4 each
    versus = row(tables["statistics"], method="simmim", reference="nnUNetTrainer", metric="dice")
    assert (versus["pairs"], versus["mean_difference"]) == (4, pytest.approx(0.15))
    missing = {(r["method"], r["fold"]): r["detail"] for r in tables["problems"]}
    assert set(missing) == {("dino", "0"), ("dino", "1")}  # dino lacks seed 1
    assert missing[("dino", "1")].endswith("1 -tr SwinUNETR_DINO_Trainer -p nnsslPlans_seed1")
    markdown = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert "## Seed noise" in markdown and "0.600 0.500" in markdown
