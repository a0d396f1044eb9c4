"""Issue 13, a fair study: aligned plans (nnssl_align_plans), the trainer's alignment check, encoder choice and
seeded fine-tuning, through the real console scripts on the session's synthetic CT task and corpus, whose
native fingerprints differ (the task's intensities come from its organs, the corpus's from body masks; the
task's spacing is about 1.6 x 1.6 x 2.5 mm, the corpus's 2 mm)."""
from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import CORPUS_ID, SCRATCH_MODEL, run_cli, train_without_validation
from nnssl import align_plans as align_module
from nnssl import io
from nnssl.align_plans import swin_patch_within
from nnssl.checkpoints import save_encoder
from nnssl.data.loader import load_corpus
from nnssl.networks import SwinEncoder, build_swinunetr, get_preset

TRAINER = "SwinUNETR_BYOL_Trainer"  # no other test fine-tunes BYOL on the session task
RUN = "aligned_test"
SHORT = {"nnssl_num_epochs": "1", "nnssl_iterations_per_epoch": "2"}
SLOW = 1800  # seconds a training may take on a machine shared with other test runs (seconds when idle)


def test_swin_patch_keeps_nnunets_voxel_budget():
    assert swin_patch_within([40, 64, 80], [39.5, 63.5, 65.5]) == [32, 64, 64]
    assert swin_patch_within([128, 128, 128], [300, 300, 300]) == [128, 128, 128]
    patch = swin_patch_within([80, 160, 112], [90, 200, 150])
    assert all(s % 32 == 0 for s in patch) and math.prod(patch) <= 80 * 160 * 112


@pytest.mark.parametrize("planned, median, widened", [
    ([24, 28, 30], [20, 25, 31], [32, 32, 64]),  # a task no larger than 32 on any side
    ([40, 40, 40], [60, 70, 50], [32, 64, 32]),  # nnU-Net's budget rounds to one 32^3 patch
])
def test_swin_patch_keeps_a_bottleneck_of_more_than_one_voxel(planned, median, widened):
    assert swin_patch_within(planned, median) == widened  # the side where the median shape is largest


def test_tiny_swinunetr_trains_a_step_on_the_smallest_planned_patch():
    torch.manual_seed(0)
    net = build_swinunetr(get_preset("tiny"), in_channels=1, out_channels=2).train()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    with pytest.raises(ValueError, match="more than 1 spatial element"):  # what the widening avoids
        net(torch.randn(2, 1, 32, 32, 32))
    patch = swin_patch_within([24, 28, 30], [20, 25, 31])
    image, target = torch.randn(2, 1, *patch), torch.randint(0, 2, (2, *patch))
    loss = torch.nn.functional.cross_entropy(net(image), target)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)


# exits 3 when another process holds the nnssl.io lock of the file argv[1] names
LOCK_HELD = ("import os, sys; from pathlib import Path; from nnssl.io import try_lock; "
             "lock = Path(sys.argv[1]); sys.exit(0 if try_lock(os.open(lock, os.O_RDWR | os.O_CREAT), lock) else 3)")


def test_aligning_writes_the_plans_under_their_lock(ct_task, pretrain_corpus, monkeypatch):
    identifier = "nnsslLockTest"  # its own plans file: the other tests' aligned plans stay as they are
    plans_file = ct_task.preprocessed / f"{identifier}.json"
    lock_held = []

    def save_json_checking_the_lock(obj, path):
        lock = Path(path).parent / f".{Path(path).name}.lock"
        lock_held.append(subprocess.run([sys.executable, "-c", LOCK_HELD, str(lock)]).returncode == 3)
        io.save_json(obj, path)

    monkeypatch.setattr(align_module, "save_json", save_json_checking_the_lock)
    try:
        align_module.align_plans([ct_task.dataset_id], CORPUS_ID, identifier, preprocess=False)
        assert json.loads(plans_file.read_text())["plans_name"] == identifier
    finally:
        plans_file.unlink(missing_ok=True)
    assert lock_held == [True]


class Killed(BaseException):
    """What a SIGKILL halfway through the copy amounts to, for the files on disk."""


def test_a_copy_of_dataset_json_cut_off_by_a_kill_leaves_the_old_one(ct_task, pretrain_corpus, monkeypatch):
    identifier = "nnsslKillTest"  # its own plans file: the other tests' aligned plans stay as they are
    target = ct_task.preprocessed / "dataset.json"
    before = target.read_bytes()

    copyfile = shutil.copyfile

    def copy_killed_halfway(source, destination, **options):
        if Path(source).name != "dataset.json":  # nnU-Net's own copies go through
            return copyfile(source, destination, **options)
        Path(destination).write_bytes(Path(source).read_bytes()[:len(before) // 2])
        raise Killed

    monkeypatch.setattr(shutil, "copyfile", copy_killed_halfway)
    try:
        with pytest.raises(Killed):
            align_module.align_plans([ct_task.dataset_id], CORPUS_ID, identifier, preprocess=False)
    finally:
        (ct_task.preprocessed / f"{identifier}.json").unlink(missing_ok=True)
    assert target.read_bytes() == before
    assert not list(ct_task.preprocessed.glob(".dataset.json.*"))  # no temporary file left behind


@pytest.fixture(scope="module")
def byol_run(pretrain_corpus, nnunet_env) -> Path:
    """A BYOL run folder with student and teacher encoders whose metadata is the corpus's (as the loop writes it)."""
    corpus = load_corpus([CORPUS_ID])
    folder = nnunet_env.nnssl_results / "byol" / RUN
    for source, seed in (("student", 1), ("teacher", 2)):
        torch.manual_seed(seed)
        meta = {"backbone": get_preset("tiny").to_dict(), "in_channels": 1, "method": "byol", "corpus":
                list(corpus.datasets), "spacing": list(corpus.spacing), "normalization": list(corpus.normalization),
                "intensity_properties": corpus.intensity_properties, "run": RUN, "step": 2, "source": source}
        save_encoder(folder / f"encoder{'' if source == 'student' else '_teacher'}_final.pth",
                     SwinEncoder(get_preset("tiny")), meta)
    (folder / "config.json").write_text(json.dumps({"batch_size": 2, "accumulate": 1, "patch_size": [32, 32, 32]}))
    (folder / "log.csv").write_text("step,samples_per_s\n1,4.0\n2,2.0\n")  # 0.5 s + 1 s
    return folder


def _settings(model: Path) -> dict:
    return json.loads((model / "plans.json").read_text())["configurations"]["3d_fullres"]["nnssl"]


def test_aligned_plans_train_predict_continue_and_report(ct_task, pretrain_corpus, byol_run, nnunet_env, tmp_path):
    run_cli("nnssl_align_plans", "-d", ct_task.dataset_id, "-np", "1")
    corpus = json.loads((nnunet_env.preprocessed / "Dataset501_CTcorpus" / "nnUNetPlans.json").read_text())
    native = json.loads((ct_task.preprocessed / "nnUNetPlans.json").read_text())
    aligned = json.loads((ct_task.preprocessed / "nnsslPlans.json").read_text())
    corpus_ct = corpus["foreground_intensity_properties_per_channel"]["0"]
    assert native["foreground_intensity_properties_per_channel"]["0"] != corpus_ct  # the fingerprints differ
    assert aligned["foreground_intensity_properties_per_channel"]["0"] == corpus_ct
    config = aligned["configurations"]["3d_fullres"]
    assert config["spacing"] == corpus["configurations"]["3d_fullres"]["spacing"] == [2.0, 2.0, 2.0]
    assert config["normalization_schemes"] == ["CTNormalization"] and list(aligned["configurations"]) == ["3d_fullres"]
    record = aligned["nnssl_alignment"]
    assert all(s % 32 == 0 for s in config["patch_size"]) and config["patch_size"] == record["patch_size"]
    assert math.prod(config["patch_size"]) <= math.prod(record["nnunet_patch_size"])
    assert record["spacing_from"] == "corpus" and record["normalization"]["0"]["from"] == "corpus"
    cases = len(list((ct_task.preprocessed / config["data_identifier"]).glob("*.pkl")))
    assert cases == 8  # nnU-Net preprocessed every training case with the aligned plans

    env = {**SHORT, "nnssl_run": RUN, "nnssl_encoder": "teacher"}
    # validated once, by the --c below (nnU-Net's validation on a checkpoint_final is what --c adds)
    result = train_without_validation(ct_task.dataset_id, "3d_fullres", "0", "-tr", TRAINER, "-p", "nnsslPlans",
                                      "-device", "cpu", env=env, timeout=SLOW)
    model = nnunet_env.results / ct_task.dataset / f"{TRAINER}__nnsslPlans__3d_fullres"
    settings = _settings(model)
    assert "the task's plans are aligned with the encoder's pretraining" in result.stdout
    assert settings["alignment"]["status"] == "aligned" and settings["seeds"] == {"0": 0}
    assert settings["pretrained"]["encoder"] == "teacher" and settings["pretrained"]["encoder_from"] == "nnssl_encoder"
    assert settings["pretrained"]["path"].endswith("encoder_teacher_final.pth")

    # nnU-Net's own commands work unchanged on the aligned identifier
    predictions = tmp_path / "predictions"
    run_cli("nnUNetv2_predict", "-i", ct_task.raw / "imagesTs", "-o", predictions, "-d", ct_task.dataset_id,
            "-c", "3d_fullres", "-f", "0", "-tr", TRAINER, "-p", "nnsslPlans", "-device", "cpu", "-npp", "1", "-nps", "1",
            "--disable_tta", timeout=SLOW)
    assert len(list(predictions.glob("*.nii.gz"))) == 2
    run_cli("nnUNetv2_train", ct_task.dataset_id, "3d_fullres", "0", "-tr", TRAINER, "-p", "nnsslPlans",
            "-device", "cpu", "--c", env=env, timeout=SLOW)
    assert (model / "fold_0" / "validation" / "summary.json").is_file()

    result = train_without_validation(ct_task.dataset_id, "3d_fullres", "0", "-tr", TRAINER, "-device", "cpu",
                                      env={**SHORT, "nnssl_run": RUN}, timeout=SLOW)
    warning = next(line for line in result.stdout.splitlines() if "WARNING" in line)
    assert "not aligned with the encoder's pretraining" in warning
    assert f"pretraining clip [{corpus_ct['percentile_00_5']:.4g}, {corpus_ct['percentile_99_5']:.4g}]" in warning
    assert f"nnssl_align_plans -d {ct_task.dataset} --corpus 501, then train with -p nnsslPlans" in warning
    native_settings = _settings(nnunet_env.results / ct_task.dataset / f"{TRAINER}__nnUNetPlans__3d_fullres")
    assert native_settings["alignment"]["status"] == "not aligned"
    assert native_settings["pretrained"]["encoder"] == "student"  # BYOL's plan: its online network

    run_cli("nnssl_report", ct_task.dataset_id, "-o", tmp_path / "report")
    with open(tmp_path / "report" / "alignment.csv", newline="", encoding="utf-8") as f:
        rows = {row["plans"]: row for row in csv.DictReader(f) if row["method"] == "byol"}
    assert rows["nnsslPlans"]["aligned"] == "aligned" and rows["nnUNetPlans"]["aligned"] == "not aligned"
    assert rows["nnsslPlans"]["encoder"] == "teacher" and "CT intensities" in rows["nnUNetPlans"]["differences"]
    with open(tmp_path / "report" / "budget.csv", newline="", encoding="utf-8") as f:
        budget = next(row for row in csv.DictReader(f) if row["method"] == "byol")
    assert (budget["steps"], budget["volumes_seen"], budget["crop"]) == ("2", "4", "32x32x32")
    assert float(budget["wall_time_h"]) == pytest.approx(1.5 / 3600)
    assert "## What the study held equal" in (tmp_path / "report" / "report.md").read_text()


@pytest.mark.parametrize("workers", ["0", "2"])
def test_one_seed_gives_the_same_checkpoint(ct_task, nnunet_env, tmp_path, workers):
    weights = []
    for attempt in ("a", "b"):
        results = tmp_path / attempt
        train_without_validation(ct_task.dataset_id, "3d_fullres", "1", "-tr", "SwinUNETR_Scratch_Trainer",
                                 "-device", "cpu", env={**SHORT, "nnUNet_results": str(results),
                                                        "nnUNet_n_proc_DA": workers, "nnssl_seed": "3"}, timeout=SLOW)
        model = results / ct_task.dataset / SCRATCH_MODEL
        weights.append(torch.load(model / "fold_1" / "checkpoint_final.pth", weights_only=False)["network_weights"])
        assert _settings(model)["seeds"] == {"1": 3}
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
