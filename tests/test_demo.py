"""nnssl_demo: its dry run lists the miniature study with the CPU settings and only the demo's own folders;
synthetic data is made once and an incomplete task is remade; the summary table from hand-made report and
CKA files. The demo itself (about 15 minutes) is not run here."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from nnssl.benchmark.demo import demo_plan, make_synthetic_data, run_demo, summary_rows
from nnssl.benchmark.study import load_study
from nnssl.errors import NnsslError

from conftest import run_cli

ROOTS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnssl_results")


def test_dry_run_lists_the_miniature_study_in_the_demo_folder(tmp_path):
    out = tmp_path / "demo"
    text = run_cli("nnssl_demo", "--dry-run", "-o", out, env={"nnUNet_results": "/users/real/results"}).stdout
    jobs = [line for line in text.splitlines() if line.startswith("[new] ")]
    counts = {kind: sum(kind in line for line in jobs) for kind in
              ("nnssl_prepare_corpus", "nnssl_align_plans", "nnssl_pretrain", "nnssl_fewshot",
               "nnUNetv2_train", "nnssl_cka", "nnssl_report")}
    # (2 SwinUNETR trainers + the nnU-Net baseline) x (CT: 2-shot fold 5 and many-shot fold 0; MRI: many-shot
    # fold 0); CKA few- vs many-shot per SwinUNETR trainer on the CT task
    assert counts == {"nnssl_prepare_corpus": 1, "nnssl_align_plans": 2, "nnssl_pretrain": 1,
                      "nnssl_fewshot": 1, "nnUNetv2_train": 9, "nnssl_cka": 2, "nnssl_report": 1}
    assert len(jobs) == sum(counts.values())
    assert {line.split(" -m ")[1].split()[0] for line in jobs if "nnssl_pretrain" in line} == {"smit"}
    trainings = [line for line in jobs if "nnUNetv2_train" in line]
    assert all(" -device cpu" in line and "nnUNet_n_proc_DA=0" in line for line in trainings)
    swin = [line for line in trainings if "-tr SwinUNETR_" in line]
    assert len(swin) == 6 and all("nnssl_backbone=tiny" in line and "nnssl_num_epochs=15" in line for line in swin)
    baseline = [line for line in trainings if "-tr nnUNetTrainerAdam_nnsslSchedule" in line]
    assert len(baseline) == 3 and all("nnssl_num_epochs=15" in line and "nnssl_unet_base_features=16" in line and
                                      "nnssl_backbone" not in line for line in baseline)  # same schedule, narrow CNN
    assert sum(" 601 3d_fullres 5 " in line for line in jobs) == 3  # the 2-shot fold follows nnU-Net's five
    # the aligned study: the corpus's plans on both tasks (the baseline too), one pretraining budget for every method
    assert all(line.endswith("-p nnsslPlans -device cpu") for line in trainings)
    assert text.count("20 optimizer steps x 4 volumes = 80 volumes seen") == 1
    assert f"nnssl_prepare_corpus -i {out / 'corpus_raw'} -d 501" in text
    assert f"{out / 'nnUNet_results'}/Dataset601_SynthCT/SwinUNETR_SMIT_Trainer" in text  # not the user's folder
    assert "/users/real/results" not in text and "missing inputs" not in text
    assert json.loads((out / "plan.json").read_text()) == demo_plan()
    assert not (out / "nnUNet_raw").exists()  # a dry run makes no data


def test_environment_is_restored_and_other_settings_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_raw", "/users/real/raw")
    monkeypatch.delenv("nnssl_results", raising=False)
    out = tmp_path / "demo"
    run_demo(out, quick=True, dry_run=True)
    assert os.environ["nnUNet_raw"] == "/users/real/raw" and "nnssl_results" not in os.environ
    quick = demo_plan(quick=True)
    assert quick["finetune_env"]["nnssl_num_epochs"] != demo_plan()["finetune_env"]["nnssl_num_epochs"]
    run_demo(out, dry_run=True)  # nothing trained yet: the plan may still change
    (out / "nnssl_results" / "smit").mkdir(parents=True)
    with pytest.raises(NnsslError, match=r"holds a demo made with other settings.*with or without --quick\?.*-o "):
        run_demo(out, quick=True, dry_run=True)


def test_synthetic_data_is_made_once_and_an_incomplete_task_is_remade(tmp_path, monkeypatch):
    study = load_study(Path(__file__).resolve().parents[1] / "plans" / "demo.json")
    settings = {"corpus_volumes": 2, "corpus_seed": 0,
                "volume_shape": {"min_shape": [8, 16, 16], "max_shape": [8, 16, 16], "spacing": [2.0, 2.0, 3.0]}}
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "nnUNet_raw"))
    make_synthetic_data(study, settings, tmp_path)
    ct, mri = tmp_path / "nnUNet_raw" / "Dataset601_SynthCT", tmp_path / "nnUNet_raw" / "Dataset602_SynthMRI"
    assert len(list((tmp_path / "corpus_raw").glob("ct_*.nii.gz"))) == 2
    assert len(list((ct / "labelsTr").iterdir())) == 10 and json.loads((mri / "dataset.json").read_text())[
        "imaging_modality"] == "MRI"
    stamp = (ct / "dataset.json").stat().st_mtime_ns
    (mri / "labelsTr" / "SynthMRI_003.nii.gz").unlink()
    make_synthetic_data(study, settings, tmp_path)
    assert (ct / "dataset.json").stat().st_mtime_ns == stamp  # complete: kept
    assert (mri / "labelsTr" / "SynthMRI_003.nii.gz").is_file()  # incomplete: made again
    assert not (tmp_path / ".staging").exists()


def test_summary_rows_pivot_dice_and_encoder_cka(tmp_path):
    study = load_study(Path(__file__).resolve().parents[1] / "plans" / "demo.json")
    dice = tmp_path / "dice.csv"
    dice.write_text("task,modality,method,family,shot,folds,cases,dice_mean\n"
                    "Dataset601_SynthCT,CT,smit,self-distillation,2-shot,1,2,0.25\n"
                    "Dataset601_SynthCT,CT,smit,self-distillation,many-shot,1,2,0.5\n"
                    "Dataset601_SynthCT,CT,scratch,scratch,many-shot,1,2,0.125\n")
    cka = tmp_path / "cka" / "Dataset601_SynthCT" / "SwinUNETR_SMIT_Trainer" / "2shot_fold0_seed0" / "cka.json"
    cka.parent.mkdir(parents=True)
    # encoder stages 0.5 and 1.0 -> 0.75; the decoder block is not part of the encoder mean, nor is a stage whose
    # CKA is undefined (NaN, as nnssl_cka writes it when a layer's features do not vary over the patches)
    cka.write_text(json.dumps({"comparisons": [{"diagonal": {"stage1": 0.5, "stage3": math.nan, "stage4": 1.0,
                                                              "encoder10": 0.0}}]}))
    rows = summary_rows(dice, tmp_path / "cka", study)
    assert rows == [
        {"task": "Dataset601_SynthCT", "modality": "CT", "method": "scratch", "family": "scratch",
         "many-shot": 0.125},
        {"task": "Dataset601_SynthCT", "modality": "CT", "method": "smit", "family": "self-distillation",
         "2-shot": 0.25, "many-shot": 0.5, "CKA 2-shot vs many": 0.75},
    ]
    assert summary_rows(tmp_path / "absent.csv", tmp_path / "cka", study) == []


def test_organ_scale_enlarges_spleen_and_kidneys_and_leaves_the_rest():
    import numpy as np
    from nnssl.data.synthetic import LABELS, SyntheticSpec, synthetic_case

    counts = {}
    for scale in (1.0, 1.4):  # plans/demo.json's volume_shape
        spec = SyntheticSpec("CT", (28, 28, 56), (28, 28, 56), (2.0, 2.0, 2.0), organ_scale=scale)
        image, labels = synthetic_case(np.random.default_rng(3), spec)
        counts[scale] = {name: int((labels == value).sum()) for name, value in LABELS.items()}
        assert image.shape == labels.shape == (28, 28, 56)
    for organ in ("spleen", "kidney"):
        assert counts[1.4][organ] > 2 * counts[1.0][organ] > 0  # radii x1.4: about 2.7 times the volume
    assert counts[1.4]["liver"] + counts[1.4]["tumour"] >= 0.9 * (counts[1.0]["liver"] + counts[1.0]["tumour"])
