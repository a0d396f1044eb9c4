"""Issue 19, through the console scripts: TensorBoard logging, provenance, --plan, --print-config, nnU-Net's
option spellings, fast --help, misspelt knobs, and hints for datasets that are not preprocessed."""
from __future__ import annotations

import csv
import json
import os
import shutil
import tomllib
from pathlib import Path

import pytest

from conftest import CORPUS_ID, SCRATCH_MODEL, pretrain_run, run_cli, train_without_validation
from nnssl.data.synthetic import write_task
from nnssl.plans import plans_dir

REPO = Path(__file__).resolve().parent.parent
PROVENANCE_KEYS = {"nnssl", "nnssl_commit", "torch", "monai", "nnunetv2", "python", "device", "world_size"}


def _edited_plan(tmp_path: Path, method: str, **changes) -> Path:
    plan = json.loads((plans_dir() / "pretrain" / f"{method}.json").read_text(encoding="utf-8"))
    path = tmp_path / f"my_{method}.json"
    path.write_text(json.dumps({**plan, **changes}), encoding="utf-8")
    return path


def test_tensorboard_logger_mirrors_log_csv_and_config_records_plan_and_provenance(pretrain_corpus, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    plan = _edited_plan(tmp_path, "simmim", warmup_epochs=0.5)
    _, folder = pretrain_run("simmim", "--logger", "tensorboard", "--plan", plan, run="tb", epochs=1,
                             steps_per_epoch=3)
    events = list(folder.glob("events.out.tfevents.*"))
    assert events, f"no event file in {sorted(p.name for p in folder.iterdir())}"
    with open(folder / "log.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    numeric = {k for k, v in rows[0].items() if k not in ("step", "time") and v != ""}
    accumulator = EventAccumulator(str(folder))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {"lr", "loss"} <= numeric <= tags
    lr = [event.value for event in accumulator.Scalars("lr")]
    assert [event.step for event in accumulator.Scalars("lr")] == [int(r["step"]) for r in rows]
    assert lr == pytest.approx([float(r["lr"]) for r in rows], rel=1e-4)

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    assert config["plan_file"] == str(plan.resolve()) and config["warmup_epochs"] == 0.5
    assert config["logger"] == "tensorboard"
    assert PROVENANCE_KEYS <= set(config["provenance"])
    assert config["provenance"]["world_size"] == 1 and config["provenance"]["device"].startswith("cpu")
    assert config["provenance"]["nnssl_commit"]  # the tests run from a git checkout


def test_tensorboard_missing_says_how_to_install_it(nnunet_env, tmp_path):
    hidden = tmp_path / "hide" / "tensorboard"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('tensorboard hidden by the test')\n", encoding="utf-8")
    path = os.pathsep.join([str(hidden.parent), os.environ.get("PYTHONPATH", "")])
    result = run_cli("nnssl_pretrain", "-m", "simmim", "-d", CORPUS_ID, "-device", "cpu", "--logger", "tensorboard",
                     "--run", "no_tb", env={"PYTHONPATH": path}, check=False)
    assert result.returncode == 2, result.stderr
    assert "pip install 'nnssl[tensorboard]'" in result.stderr and "Traceback" not in result.stderr
    assert not (nnunet_env.nnssl_results / "simmim" / "no_tb").exists()


def test_print_config_names_where_each_value_comes_from(tmp_path):
    plan = _edited_plan(tmp_path, "dino", epochs=7)
    # no nnU-Net folders, no data, no GPU: only settings are resolved
    env = {"nnUNet_raw": None, "nnUNet_preprocessed": None, "nnUNet_results": None, "nnssl_results": None}
    result = run_cli("nnssl_pretrain", "-m", "dino", "-d", "501", "--plan", plan, "--batch-size", "3", "-device",
                     "cuda", "--plans-override", "grad_clip=1.0", "method.out_dim=1024", "--print-config", env=env)
    table = {line.split()[0]: line.split(maxsplit=2)[1:] for line in result.stdout.splitlines()[1:]}
    assert table["epochs"] == ["7", f"plan {plan.resolve()}"]
    assert table["batch_size"] == ["3", "command line"]
    assert table["device"] == ['"cuda"', "command line"]
    assert table["grad_clip"] == ["1.0", "--plans-override"]
    assert table["method.out_dim"] == ["1024", "--plans-override"]
    assert table["method.momentum"] == ["0.996", "default"]
    assert table["seed"] == ["0", "default"]
    assert table["run"] == ['"paper_d501"', "default"]


def test_every_help_is_quick_and_documents_defaults():
    """--help imports no torch (which took 7-8 s): checked through each console script with Python's import log."""
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    checked = 0
    for name, target in scripts.items():
        module = target.split(":")[0]
        if not (REPO / (module.replace(".", "/") + ".py")).is_file():
            continue  # declared for a command that this checkout does not have yet
        result = run_cli(name, "--help", env={"PYTHONPROFILEIMPORTTIME": "1"})
        imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if "|" in line}
        heavy = sorted(m for m in imported if m.split(".")[0] in ("torch", "monai", "nnunetv2"))
        assert not heavy, f"{name} --help imports {heavy[:5]}"
        checked += 1
    assert checked >= 11
    text = run_cli("nnssl_pretrain", "--help").stdout
    for flag, default in (("--epochs", "else 100"), ("--seed", "default 0"), ("-device", "default cuda")):
        assert flag in text and default in " ".join(text.split())


def test_misspelt_trainer_knob_is_an_error_with_a_suggestion(ct_task):
    result = run_cli("nnUNetv2_train", ct_task.dataset_id, "3d_fullres", "0", "-tr", "SwinUNETR_Scratch_Trainer",
                     "-device", "cpu", env={"nnssl_epochs": "50"}, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "nnssl_epochs" in result.stderr and "Did you mean 'nnssl_num_epochs'?" in result.stderr


def test_finetuned_plans_record_provenance_per_fold(trained_scratch):
    plans = json.loads((trained_scratch / "plans.json").read_text(encoding="utf-8"))
    record = plans["configurations"]["3d_fullres"]["nnssl"]["provenance"]["0"]
    assert PROVENANCE_KEYS <= set(record) and record["world_size"] == 1 and record["device"].startswith("cpu")


def test_nnunet_spellings_and_unpreprocessed_dataset_hint(ct_task, nnunet_env, tmp_path):
    write_task(nnunet_env.raw, 932, "RawOnlyHint", num_training=2, seed=3)
    result = run_cli("nnssl_fewshot", "-d", "932", "--shots", "1", check=False)
    assert result.returncode == 2 and "nnUNetv2_plan_and_preprocess -d 932" in result.stderr
    dry = run_cli("nnssl_benchmark", "-d", "Dataset990_SynthCT", "--methods", "scratch", "-f", "0", "-device", "cpu",
                  "--dry-run", check=False)
    assert "unrecognized arguments" not in dry.stderr and "expected one argument" not in dry.stderr


def test_plans_cite_no_internal_notes():
    for path in plans_dir().rglob("*.json"):
        assert "STUDY.md" not in path.read_text(encoding="utf-8"), path


def test_report_prints_provenance_and_warns_about_different_versions(trained_scratch, ct_task, tmp_path):
    results = tmp_path / "results"
    dataset = results / ct_task.dataset
    shutil.copytree(trained_scratch, dataset / trained_scratch.name)
    other = shutil.copytree(trained_scratch, dataset / "SwinUNETR_SimMIM_Trainer__nnUNetPlans__3d_fullres")
    plans = json.loads((other / "plans.json").read_text(encoding="utf-8"))
    plans["configurations"]["3d_fullres"]["nnssl"]["provenance"]["0"]["torch"] = "2.0.0"
    (other / "plans.json").write_text(json.dumps(plans), encoding="utf-8")
    result = run_cli("nnssl_report", "-o", tmp_path / "report", env={"nnUNet_results": str(results)})
    assert "different torch versions" in result.stderr and "2.0.0" in result.stderr
    with open(tmp_path / "report" / "provenance.csv", newline="", encoding="utf-8") as f:
        rows = {row["method"]: row for row in csv.DictReader(f)}
    assert rows["simmim"]["torch"] == "2.0.0" and rows["scratch"]["torch"] != "2.0.0"
    assert rows["scratch"]["stage"] == "fine-tuning" and rows["scratch"]["world_size"] == "1"
    assert "## Provenance" in (tmp_path / "report" / "report.md").read_text(encoding="utf-8")


def test_imported_trainer_takes_an_encoder_of_any_method_from_the_knob(ct_task, tmp_path):
    from nnssl.checkpoints import save_encoder
    from nnssl.networks import SwinEncoder, get_preset

    encoder = tmp_path / "tang_encoder.pth"
    save_encoder(encoder, SwinEncoder(get_preset("tiny")), {"backbone": get_preset("tiny").to_dict(),
                                                              "in_channels": 1, "method": "swinssl"})
    results = tmp_path / "results"  # not the session's: other tests' reports list every model folder there
    train_without_validation(ct_task.dataset_id, "3d_fullres", "0", "-tr", "SwinUNETR_Imported_Trainer", "-device",
                             "cpu", env={"nnssl_encoder_file": str(encoder), "nnssl_num_epochs": "1",
                                         "nnssl_iterations_per_epoch": "1", "nnUNet_results": str(results)})
    folder = results / ct_task.dataset / "SwinUNETR_Imported_Trainer__nnUNetPlans__3d_fullres"
    record = json.loads((folder / "plans.json").read_text(encoding="utf-8"))["configurations"]["3d_fullres"]["nnssl"]
    assert record["pretrained"]["path"] == str(encoder.resolve()) and record["pretrained"]["method"] == "swinssl"
    assert (folder / "fold_0" / "checkpoint_final.pth").is_file()


def test_nnunet_weights_and_biases_switch_works_with_our_trainers(ct_task, tmp_path):
    pytest.importorskip("wandb", reason="wandb is not installed (pip install wandb); nnU-Net's W&B logger needs it")
    # nnU-Net's logger logs per epoch; its final validation adds nothing to W&B
    train_without_validation(ct_task.dataset_id, "3d_fullres", "1", "-tr", "SwinUNETR_Scratch_Trainer", "-device",
                             "cpu", env={"nnUNet_wandb_enabled": "1", "nnUNet_wandb_mode": "offline",
                                         "nnUNet_wandb_project": "nnssl-test", "nnUNet_results": str(tmp_path / "results"),
                                         "nnssl_num_epochs": "1", "nnssl_iterations_per_epoch": "1"})
    folder = tmp_path / "results" / ct_task.dataset / SCRATCH_MODEL
    runs = list((folder / "fold_1" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, "no offline W&B run in the fold folder"
    logged = runs[0].read_bytes()  # protobuf records: the logged keys are stored as plain UTF-8
    assert all(key in logged for key in (b"train_losses", b"val_losses", b"lrs", b"mean_fg_dice")), \
        "the epoch's losses, learning rate and Dice did not reach W&B"


def test_mic_dkfz_nnssl_beside_ours_is_refused(nnunet_env, tmp_path):
    # what `pip install` of MIC-DKFZ's nnssl leaves: a distribution declaring its nnssl_train entry point
    dist = tmp_path / "site" / "nnssl-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: nnssl\nVersion: 0.1\n", encoding="utf-8")
    (dist / "entry_points.txt").write_text("[console_scripts]\nnnssl_train = nnssl.run.run_training:run_training_entry"
                                           "\n", encoding="utf-8")
    path = os.pathsep.join([str(dist.parent), os.environ.get("PYTHONPATH", "")])
    result = run_cli("nnssl_report", "-o", tmp_path / "r", env={"PYTHONPATH": path}, check=False)
    assert result.returncode == 2 and "MIC-DKFZ's nnssl" in result.stderr and "nnssl_train" in result.stderr


def test_results_folder_in_the_other_nnssl_layout_is_refused(nnunet_env, tmp_path):
    theirs = tmp_path / "their_results"
    (theirs / "Dataset745_OpenMind" / "BaseMAETrainer__nnsslPlans__onemmiso").mkdir(parents=True)
    result = run_cli("nnssl_pretrain", "-m", "simmim", "-d", CORPUS_ID, "-device", "cpu",
                     env={"nnssl_results": str(theirs)}, check=False)
    assert result.returncode == 2 and "MIC-DKFZ" in result.stderr and "Dataset745_OpenMind" in result.stderr
    assert sorted(p.name for p in theirs.iterdir()) == ["Dataset745_OpenMind"]
