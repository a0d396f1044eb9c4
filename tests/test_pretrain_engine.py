"""Issue 3: corpus preparation through nnU-Net, the shared loop, outputs, kill/resume, DDP, errors."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import BIN, CORPUS_ID, TINY_PRETRAIN, pretrain_run, run_cli
from nnssl.checkpoints import load_encoder_file, load_encoder_weights
from nnssl.cli.pretrain import main as pretrain_main
from nnssl.data.synthetic import write_corpus
from nnssl.networks import build_swinunetr

SECOND_CORPUS_ID = 502


def _log_rows(run: Path) -> list[dict]:
    import csv

    with open(run / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def second_corpus(pretrain_corpus, tmp_path_factory):
    """Dataset502: good volumes in several formats (NIfTI, MHA, NRRD, a DICOM series) plus broken ones."""
    raw = tmp_path_factory.mktemp("raw_mixed")
    good = write_corpus(raw / "nifti", 2, seed=11)
    image = sitk.ReadImage(str(good[0]))
    sitk.WriteImage(image, str(raw / "scan_a.mha"))
    sitk.WriteImage(image, str(raw / "scan_b.nrrd"))
    series = raw / "dicom" / "series1"
    series.mkdir(parents=True)
    volume = sitk.Cast(image, sitk.sitkInt16)
    for i in range(volume.GetSize()[2]):
        slice_ = volume[:, :, i]
        slice_.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.1.77")
        slice_.SetMetaData("0020|0032", f"0\\0\\{i * image.GetSpacing()[2]:.3f}")
        slice_.SetMetaData("0020|0013", str(i))
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(series / f"{i:03d}.dcm"))
        writer.Execute(slice_)
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((20, 20), np.int16)), str(raw / "flat_2d.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(np.full((20, 20, 20), -1000, np.int16)), str(raw / "constant.nii.gz"))
    (raw / "truncated.nii.gz").write_bytes(good[1].read_bytes()[:400])
    spaced = sitk.GetImageFromArray(np.random.default_rng(0).normal(0, 100, (20, 20, 20)).astype(np.float32))
    spaced.SetSpacing((0.001, 1.0, 1.0))
    sitk.WriteImage(spaced, str(raw / "absurd_spacing.nii.gz"))
    nan = sitk.GetArrayFromImage(image).astype(np.float32)
    nan[5, 5, 5] = np.nan
    nan_image = sitk.GetImageFromArray(nan)
    nan_image.CopyInformation(image)
    sitk.WriteImage(nan_image, str(raw / "with_nan.mha"))
    result = run_cli("nnssl_prepare_corpus", "-i", raw, "-d", SECOND_CORPUS_ID, "-n", "Mixed", "-np", "1")
    return raw, result


def test_prepare_corpus_reports_and_skips_bad_volumes(second_corpus, nnunet_env):
    raw, result = second_corpus
    report = json.loads((nnunet_env.raw / "Dataset502_Mixed" / "corpus_report.json").read_text(encoding="utf-8"))
    accepted = {item["source"] for item in report["accepted"]}
    skipped = {item["source"]: item["reason"] for item in report["skipped"]}
    assert {"scan_a.mha", "scan_b.nrrd", "nifti/ct_0000.nii.gz", "nifti/ct_0001.nii.gz"} <= accepted
    assert any(source.startswith("dicom/series1#") for source in accepted)
    assert "2D" in skipped["flat_2d.nii.gz"] and "empty" in skipped["constant.nii.gz"]
    assert "truncated" in skipped["truncated.nii.gz"] and "absurd spacing" in skipped["absurd_spacing.nii.gz"]
    assert "NaN" in skipped["with_nan.mha"]
    assert "5 volumes accepted, 5 skipped" in result.stdout
    plans = json.loads((nnunet_env.preprocessed / "Dataset502_Mixed" / "nnUNetPlans.json").read_text(encoding="utf-8"))
    assert plans["configurations"]["3d_fullres"]["spacing"] == [2.0, 2.0, 2.0]
    assert plans["configurations"]["3d_fullres"]["normalization_schemes"] == ["CTNormalization"]


def test_short_pooled_run_writes_every_output(second_corpus):
    result, run = pretrain_run("simmim", "-d", str(CORPUS_ID), str(SECOND_CORPUS_ID), "--plans-override",
                               "checkpoint_every=3", run="pooled", epochs=2, steps_per_epoch=4)
    for name in ("config.json", "log.csv", "progress.png", "checkpoint_final.pth", "encoder_final.pth"):
        assert (run / name).is_file(), name
    assert not (run / "checkpoint_latest.pth").exists()  # superseded by the final checkpoint
    config = json.loads((run / "config.json").read_text(encoding="utf-8"))
    assert config["datasets"] == [str(CORPUS_ID), str(SECOND_CORPUS_ID)] and config["backbone"] == "tiny"
    rows = _log_rows(run)
    assert [int(r["step"]) for r in rows] == list(range(1, 9))
    assert {"lr", "loss", "recon", "samples_per_s"} <= set(rows[0])
    encoder = load_encoder_file(run / "encoder_final.pth")
    meta = encoder.meta
    assert meta["method"] == "simmim" and meta["corpus"] == ["Dataset501_CTcorpus", "Dataset502_Mixed"]
    assert meta["spacing"] == [2.0, 2.0, 2.0] and meta["normalization"] == ["CTNormalization"]
    assert meta["in_channels"] == 1 and meta["patch_size"] == [32, 32, 32] and meta["step"] == 8
    network = build_swinunetr(encoder.preset, 1, 3)
    assert load_encoder_weights(network, encoder) == len([k for k in network.state_dict() if k.startswith("swinViT.")])
    assert f"encoder: {run / 'encoder_final.pth'}" in result.stdout


def test_loss_decreases(pretrain_corpus):
    # seeded and single-process, so the curve is reproducible; crops differ a lot, hence means over steps
    _, run = pretrain_run("simmim", "--batch-size", "4", "--lr", "1e-3", "--plans-override", "warmup_epochs=0.25", "lr_batch=null",
                          run="decrease", epochs=2, steps_per_epoch=20)
    losses = [float(r["loss"]) for r in _log_rows(run)]
    assert np.mean(losses[-20:]) < np.mean(losses[:5])


def test_same_seed_same_losses(pretrain_corpus):
    # the second run recomputes its activations in the backward (--grad-checkpointing): same gradients, same losses
    runs = [pretrain_run("simmim", "--seed", "7", *extra, run=f"seed7_{i}", epochs=1, steps_per_epoch=4)[1]
            for i, extra in enumerate([(), ("--grad-checkpointing",)])]
    first, second = ([r["loss"] for r in _log_rows(run)] for run in runs)
    assert first == second
    assert [json.loads((run / "config.json").read_text(encoding="utf-8"))["grad_checkpointing"] for run in runs] \
        == [False, True]


def _start(run: str, steps: int, checkpoint_every: int) -> subprocess.Popen:
    command = [str(BIN / "nnssl_pretrain"), "-m", "simmim", "-d", str(CORPUS_ID), *TINY_PRETRAIN, "--epochs", "1",
               "--steps-per-epoch", str(steps), "--run", run, "--plans-override", f"checkpoint_every={checkpoint_every}"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            encoding="utf-8", errors="replace")


def _wait_for(condition, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the run ended early ({process.returncode}): {process.stderr.read()[-3000:]}")
        if time.time() > deadline:
            process.kill()
            pytest.fail("timed out waiting for the run")
        time.sleep(0.2)


def test_sigkill_then_resume_finishes_with_a_continuous_log(pretrain_corpus, nnunet_env):
    run = nnunet_env.nnssl_results / "simmim" / "killed"
    process = _start("killed", steps=40, checkpoint_every=5)
    _wait_for(lambda: (run / "checkpoint_latest.pth").is_file() and len(_log_rows(run)) >= 12, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    logged_before = len(_log_rows(run))
    assert not (run / "encoder_final.pth").exists()
    pretrain_run("simmim", "--resume", "--plans-override", "checkpoint_every=5", run="killed", epochs=1,
                 steps_per_epoch=40)
    steps = [int(r["step"]) for r in _log_rows(run)]
    assert steps == list(range(1, 41))  # rows after the checkpoint were dropped and redone, none duplicated
    assert logged_before > 10
    assert load_encoder_file(run / "encoder_final.pth").meta["step"] == 40


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(pretrain_corpus, nnunet_env):
    run = nnunet_env.nnssl_results / "simmim" / "terminated"
    process = _start("terminated", steps=40, checkpoint_every=1000)
    _wait_for(lambda: (run / "log.csv").is_file() and len(_log_rows(run)) >= 5, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM
    assert "--resume" in stderr and "Traceback" not in stderr
    state = torch.load(run / "checkpoint_latest.pth", map_location="cpu", weights_only=False)
    assert state["step"] == int(_log_rows(run)[-1]["step"])


def test_two_process_gloo_ddp_run(pretrain_corpus, nnunet_env):
    # base lr 1e-3 stated for a global batch of 1: 2 processes x batch 2 x accumulate 1 scale it to 4e-3
    command = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", str(BIN / "nnssl_pretrain"),
               "-m", "simmim", "-d", str(CORPUS_ID), *TINY_PRETRAIN, "--epochs", "1", "--steps-per-epoch", "4",
               "--run-name", "ddp", "--lr", "1e-3", "--plans-override", "lr_batch=1", "warmup_epochs=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, encoding="utf-8", errors="replace",
                            timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    run = nnunet_env.nnssl_results / "simmim" / "ddp"
    assert [int(r["step"]) for r in _log_rows(run)] == [1, 2, 3, 4]
    state = torch.load(run / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert isinstance(state["rng"], list) and len(state["rng"]) == 2  # one RNG state per rank
    assert (run / "encoder_final.pth").is_file()
    config = json.loads((run / "config.json").read_text())
    assert (config["lr"], config["lr_batch"], config["lr_scaled"]) == (1e-3, 1, pytest.approx(4e-3))
    rows = _log_rows(run)
    assert float(rows[0]["lr"]) == pytest.approx(4e-3)  # no warmup: step 1 runs at the peak
    # the optimizer ran the logged schedule: its last step's lr is the last row's
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == [pytest.approx(float(rows[-1]["lr"]))] * 2


# -- errors a user can act on (in-process: fast) -------------------------------------------------------------
def _error(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        pretrain_main(list(argv))
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_unknown_method_lists_the_known_ones(capsys, pretrain_corpus):
    err = _error(capsys, "-m", "simmin", "-d", str(CORPUS_ID), "--device", "cpu")
    assert "Unknown SSL method 'simmin'" in err and "Did you mean 'simmim'" in err and "dino" in err


def test_missing_results_variable(capsys, pretrain_corpus, monkeypatch):
    monkeypatch.delenv("nnssl_results")
    err = _error(capsys, "-m", "simmim", "-d", str(CORPUS_ID), *TINY_PRETRAIN)
    assert "nnssl_results is not set" in err


def test_dataset_not_preprocessed(capsys, pretrain_corpus, nnunet_env, tmp_path):
    write_corpus(tmp_path / "raw", 2, seed=3)
    run_cli("nnssl_prepare_corpus", "-i", tmp_path / "raw", "-d", "503", "-n", "RawOnly", "-np", "1",
            "--no-preprocess")
    err = _error(capsys, "-m", "simmim", "-d", "503", *TINY_PRETRAIN)
    assert "Dataset503_RawOnly" in err and "nnUNetv2_plan_and_preprocess -d 503" in err
    err = _error(capsys, "-m", "simmim", "-d", "777", *TINY_PRETRAIN)
    assert "No dataset '777'" in err


def test_existing_run_needs_resume_and_same_settings(capsys, pretrain_corpus):
    pretrain_run("simmim", run="once", epochs=1, steps_per_epoch=2)
    base = ("-m", "simmim", "-d", str(CORPUS_ID), *TINY_PRETRAIN, "--epochs", "1", "--steps-per-epoch", "2",
            "--run", "once")
    assert "already exists" in _error(capsys, *base) and "--resume" in capsys.readouterr().err + "--resume"
    err = _error(capsys, *base, "--resume", "--lr", "0.5")
    assert "keeps its settings" in err and "lr" in err


def test_corrupt_checkpoint_on_resume(capsys, pretrain_corpus, nnunet_env):
    run = nnunet_env.nnssl_results / "simmim" / "corrupt"
    run.mkdir(parents=True)
    (run / "checkpoint_latest.pth").write_bytes(b"not a checkpoint")
    err = _error(capsys, "-m", "simmim", "-d", str(CORPUS_ID), *TINY_PRETRAIN, "--run", "corrupt", "--resume")
    assert "corrupt or truncated" in err and "Delete the damaged files" in err
    assert (run / "checkpoint_latest.pth").read_bytes() == b"not a checkpoint"  # nothing overwritten


def test_bad_overrides(capsys, pretrain_corpus):
    err = _error(capsys, "-m", "simmim", "-d", str(CORPUS_ID), "--plans-override", "learning_rate=1")
    assert "unknown setting 'learning_rate'" in err and "grad_clip" in err
    err = _error(capsys, "-m", "simmim", "-d", str(CORPUS_ID), "--plans-override", "method.ratio=0.5")
    assert "has no hyperparameter 'ratio'" in err and "mask_ratio" in err


def test_nonfinite_loss_stops_without_overwriting_good_state(pretrain_corpus, nnunet_env):
    result, run = pretrain_run("simmim", "--lr", "1e30", "--plans-override", "warmup_epochs=0", "grad_clip=null",
                               run="explodes", epochs=1, steps_per_epoch=20, check=False)
    assert result.returncode == 2 and "Non-finite" in result.stderr and "Traceback" not in result.stderr
    assert not (run / "encoder_final.pth").exists()
    latest = run / "checkpoint_latest.pth"
    if latest.exists():
        state = torch.load(latest, map_location="cpu", weights_only=False)
        assert all(torch.isfinite(v).all() for v in state["method_state"].values() if v.is_floating_point())
