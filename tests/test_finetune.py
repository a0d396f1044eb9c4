"""Issue 6 fine-tuning: SwinUNETR_<Method>_Trainer under the real nnUNetv2_train, from a real nnssl_pretrain run.

One fold is fine-tuned end to end (killed with SIGKILL after its first checkpoint, continued with --c without
nnU-Net's final validation, validated with --val, used by nnUNetv2_predict); the encoder-choice rules and the
errors are checked on trainers initialised in this process (nnU-Net's own get_trainer_from_args and
maybe_load_checkpoint), which builds the network but trains nothing.
"""
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import BIN, SCRATCH_MODEL, pretrain_run, run_cli, train_without_validation
from nnssl.checkpoints import EncoderCheckpoint, load_encoder_file, load_encoder_weights, save_encoder
from nnssl.data.synthetic import LABELS
from nnssl.methods.registry import list_methods
from nnssl.networks import ENCODER_PREFIX, SwinEncoder, build_swinunetr, encoder_state_dict, get_preset
from nnssl_trainers.pretrained_encoder import encoder_fingerprint
from nnssl_trainers.swinunetr import METHOD_TRAINERS

TINY = get_preset("tiny")
E2E_RUN = "finetune_e2e"
TRAINER = "SwinUNETR_SimMIM_Trainer"
FINETUNE_ENV = {"nnssl_run": E2E_RUN, "nnssl_num_epochs": "2", "nnssl_iterations_per_epoch": "1", "nnssl_save_every": "1",
                "nnssl_lr": "2e-4", "nnssl_checkpointing": "1"}


def make_encoder(path: Path, method: str = "smit", seed: int = 0, preset=TINY, in_channels: int = 1) -> Path:
    torch.manual_seed(seed)
    encoder = SwinEncoder(preset, in_channels=in_channels)
    return save_encoder(path, encoder, {"backbone": preset.to_dict(), "in_channels": in_channels, "method": method,
                                        "normalization": ["CTNormalization"], "run": path.parent.name})


def swin_state(trainer) -> dict[str, torch.Tensor]:
    return {k: v for k, v in trainer.network.state_dict().items() if k.startswith(ENCODER_PREFIX)}


@pytest.fixture
def start(ct_task, monkeypatch):
    """``start(trainer, fold, pretrained=None, ...)``: an nnU-Net trainer of the CT task, initialised in-process."""
    import nnunetv2.run.run_training as nnunet_run  # its maybe_load_checkpoint is wrapped by nnssl_trainers

    def start_trainer(name: str, fold: int, pretrained: Path | None = None, continue_training: bool = False,
                      **env: str | None):
        for key, value in env.items():
            if value is None:
                monkeypatch.delenv(key, raising=False)
            else:
                monkeypatch.setenv(key, value)
        trainer = nnunet_run.get_trainer_from_args(ct_task.dataset, "3d_fullres", fold, name, "nnUNetPlans",
                                                   continue_training, device=torch.device("cpu"))
        nnunet_run.maybe_load_checkpoint(trainer, continue_training, False, pretrained and str(pretrained))
        if not trainer.was_initialized:
            trainer.initialize()
        return trainer

    return start_trainer


def test_every_method_has_a_trainer():
    assert {m: c.__name__ for m, c in METHOD_TRAINERS.items()} == {
        "simclr": "SwinUNETR_SimCLR_Trainer", "mocov3": "SwinUNETR_MoCoV3_Trainer", "byol": "SwinUNETR_BYOL_Trainer",
        "rotnet": "SwinUNETR_RotNet_Trainer", "swinssl": "SwinUNETR_SwinSSL_Trainer",
        "simmim": "SwinUNETR_SimMIM_Trainer", "dino": "SwinUNETR_DINO_Trainer", "ibot": "SwinUNETR_iBOT_Trainer",
        "smit": "SwinUNETR_SMIT_Trainer"}
    assert sorted(METHOD_TRAINERS) == list_methods()  # every registered method can be fine-tuned


def test_missing_checkpoint_names_searched_paths_and_command(ct_task, tmp_path):
    result = run_cli("nnUNetv2_train", ct_task.dataset_id, "3d_fullres", "0", "-tr", "SwinUNETR_DINO_Trainer",
                     "-device", "cpu", env={"nnssl_results": str(tmp_path)}, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    # DINO fine-tunes its EMA teacher (plans/pretrain/dino.json finetune_encoder), so the teacher's file is searched
    assert (f"nnUNetv2_train: error: No pretrained 'dino' encoder found. Searched: "
            f"{tmp_path}/dino/*/encoder_teacher_final.pth") in result.stderr
    assert "Create one with: nnssl_pretrain -m dino -d <corpus dataset id>" in result.stderr


def test_encoder_choice_order(start, tmp_path):
    older = make_encoder(tmp_path / "results" / "smit" / "run_a" / "encoder_final.pth", seed=1)
    newer = make_encoder(tmp_path / "results" / "smit" / "run_b" / "encoder_final.pth", seed=2)
    os.utime(older, (time.time() - 60, time.time() - 60))
    given = make_encoder(tmp_path / "elsewhere" / "encoder_final.pth", seed=3)
    env = {"nnssl_results": str(tmp_path / "results"), "nnUNet_results": str(tmp_path / "nnUNet_results")}
    for pretrained, run, expected in ((None, None, newer), (None, "run_a", older), (given, "run_a", given)):
        trainer = start("SwinUNETR_SMIT_Trainer", 3, pretrained, nnssl_run=run, **env)
        record = trainer.nnssl_settings["pretrained"]
        file_state = load_encoder_file(expected).state_dict
        assert record["path"] == str(expected.resolve()) and record["tensors_loaded"] == len(file_state)
        network = swin_state(trainer)
        assert network.keys() == file_state.keys() and all(torch.equal(network[k], file_state[k]) for k in network)
        assert record["encoder_sha256"] == record["checkpoint_sha256"] == encoder_fingerprint(file_state)
        assert record["task_normalization"] == ["CTNormalization"]
        assert record["pretraining_normalization"] == ["CTNormalization"]


def test_single_channel_encoder_is_adapted_to_several_channels():
    # Rule: repeat the patch embedding for each channel and divide by their number, so a task whose three
    # channels carry the same image gets exactly the pretrained encoder's features.
    torch.manual_seed(0)
    encoder = SwinEncoder(TINY).eval()
    checkpoint = EncoderCheckpoint(Path("encoder_final.pth"), encoder_state_dict(encoder),
                                   {"backbone": TINY.to_dict(), "in_channels": 1})
    network = build_swinunetr(TINY, in_channels=3, out_channels=2).eval()
    assert load_encoder_weights(network, checkpoint) == len(encoder.state_dict())
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        for ours, adapted in zip(encoder(x), network.swinViT(x.repeat(1, 3, 1, 1, 1))):
            torch.testing.assert_close(adapted, ours, rtol=1e-4, atol=1e-5)


def bad_encoders(tmp_path: Path) -> dict:
    small = type(TINY).from_dict({**TINY.to_dict(), "name": "small", "window_size": 2})
    make_encoder(tmp_path / "dino.pth", method="dino")
    make_encoder(tmp_path / "small.pth", preset=small)
    make_encoder(tmp_path / "two_channels.pth", in_channels=2)
    (tmp_path / "truncated.pth").write_bytes((tmp_path / "dino.pth").read_bytes()[:4000])
    torch.save({"state_dict": {"module.patch_embed.proj.weight": torch.zeros(12, 1, 2, 2, 2)}}, tmp_path / "tang.pt")
    return {
        "wrong method": ("SwinUNETR_SMIT_Trainer", "dino.pth",
                         r"SwinUNETR_SMIT_Trainer fine-tunes 'smit' encoders, but .*dino.pth was pretrained with 'dino'"),
        "wrong backbone": ("SwinUNETR_SMIT_Trainer", "small.pth",
                           r"pretrained with backbone 'small', but nnssl_backbone asks for 'tiny' "
                           r"\(window_size 4 vs 2\)"),
        "wrong channel count": ("SwinUNETR_SMIT_Trainer", "two_channels.pth",
                                r"pretrained on 2 input channels, but this task has 1"),
        "truncated": ("SwinUNETR_SMIT_Trainer", "truncated.pth", r"truncated or not a PyTorch checkpoint"),
        "foreign": ("SwinUNETR_SMIT_Trainer", "tang.pt", r"not an nnssl encoder checkpoint.*nnssl_import"),
        "missing": ("SwinUNETR_SMIT_Trainer", "nothing.pth", r"-pretrained_weights .*nothing.pth does not exist"),
        "scratch": ("SwinUNETR_Scratch_Trainer", "dino.pth", r"trains from scratch; -pretrained_weights needs a method"),
    }


def test_bad_encoders_are_clear_errors(start, tmp_path, capsys):
    for case, (trainer, name, message) in bad_encoders(tmp_path).items():
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            start(trainer, 4, tmp_path / name, nnssl_results=str(tmp_path),
                  nnUNet_results=str(tmp_path / "nnUNet_results"))  # a refused fold_4 stays out of the shared model
        error = capsys.readouterr().err
        assert exit_info.value.code == 2, case
        assert error.startswith("nnUNetv2_train: error: ") and re.search(message, error), (case, error)


def test_checkpointing_knob_builds_a_checkpointed_network_and_rejects_bad_values(start, tmp_path, capsys):
    trainer = start("SwinUNETR_Scratch_Trainer", 5, nnssl_checkpointing="1", nnUNet_results=str(tmp_path))
    network = trainer.network
    assert trainer.nnssl_settings["checkpointing"] is True and network.use_checkpoint
    assert all(block.use_checkpoint for stage in (network.swinViT.layers1, network.swinViT.layers4)
               for block in stage[0].blocks)
    with pytest.raises(SystemExit) as exit_info:
        start("SwinUNETR_Scratch_Trainer", 5, nnssl_checkpointing="yes", nnUNet_results=str(tmp_path))
    assert exit_info.value.code == 2
    assert "nnssl_checkpointing='yes' must be 1 (on) or 0 (off)" in capsys.readouterr().err


# -- one fold end to end: pretrain, fine-tune, SIGKILL, --c, --val, predict ----------------------------------
@pytest.fixture(scope="module")
def simmim_encoder(pretrain_corpus) -> Path:
    """A real tiny SimMIM pretraining run (1 epoch x 2 steps on the session corpus)."""
    _, run = pretrain_run("simmim", run=E2E_RUN, epochs=1, steps_per_epoch=2)
    return run / "encoder_final.pth"


@pytest.fixture(scope="module")
def finetuned(simmim_encoder, ct_task, nnunet_env, tmp_path_factory) -> dict:
    """Fold 0 fine-tuned with nnUNetv2_train, SIGKILLed once checkpoint_latest.pth exists, then run with --c."""
    model = nnunet_env.results / ct_task.dataset / f"{TRAINER}__nnUNetPlans__3d_fullres"
    fold = model / "fold_0"
    log = tmp_path_factory.mktemp("finetune") / "first_run.txt"
    command = [str(BIN / "nnUNetv2_train"), str(ct_task.dataset_id), "3d_fullres", "0", "-tr", TRAINER, "-device", "cpu"]
    with open(log, "w") as output:
        process = subprocess.Popen(command, env={**os.environ, **FINETUNE_ENV}, stdout=output, stderr=subprocess.STDOUT)
        deadline = time.time() + 600
        while not (fold / "checkpoint_latest.pth").is_file() and process.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL, log.read_text(encoding="utf-8")[-3000:]
    killed_at = torch.load(fold / "checkpoint_latest.pth", map_location="cpu", weights_only=False)["current_epoch"]
    no_encoders = str(tmp_path_factory.mktemp("no_encoders"))  # --c must not need the pretrained encoder
    resumed = train_without_validation(ct_task.dataset_id, "3d_fullres", "0", "-tr", TRAINER, "-device", "cpu", "--c",
                                       env={**FINETUNE_ENV, "nnssl_results": no_encoders})
    return {"model": model, "fold": fold, "first_log": log.read_text(encoding="utf-8"), "killed_at": killed_at,
            "resumed": resumed.stdout, "no_encoders": no_encoders}


def test_weights_at_iteration_0_are_the_pretrained_encoder(finetuned, simmim_encoder):
    settings = json.loads((finetuned["model"] / "plans.json").read_text(encoding="utf-8"))["configurations"]["3d_fullres"]["nnssl"]
    record = settings["pretrained"]
    file_state = load_encoder_file(simmim_encoder).state_dict
    assert record["path"] == str(simmim_encoder.resolve()) and record["method"] == "simmim"
    assert record["tensors_loaded"] == len(file_state) and record["run"] == E2E_RUN
    assert record["encoder_sha256"] == encoder_fingerprint(file_state)
    assert f"loaded {len(file_state)} pretrained swinViT tensors from {simmim_encoder}" in finetuned["first_log"]
    assert settings["backbone"]["name"] == "tiny" and settings["backbone_from"] == f"encoder checkpoint {simmim_encoder}"
    assert settings["initial_lr"] == 2e-4  # nnssl_lr
    assert settings["checkpointing"] is True  # nnssl_checkpointing=1: the real training ran with it


def test_continue_after_sigkill(finetuned):
    final = torch.load(finetuned["fold"] / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert finetuned["killed_at"] == 1 and final["current_epoch"] == 2
    assert len(final["logging"]["train_losses"]) == 2  # epoch 0 from the killed run, epoch 1 from --c
    assert max(final["logging"]["lrs"]) == pytest.approx(2e-4)  # nnssl_lr, after one warmup epoch
    assert "no pretrained encoder is loaded" in finetuned["resumed"]
    assert "Epoch 1" in finetuned["resumed"] and "Epoch 0" not in finetuned["resumed"]
    assert not list(finetuned["fold"].glob(".checkpoint_final.pth.*.tmp"))


def test_validation_only_and_prediction(finetuned, ct_task, tmp_path):
    summary = finetuned["fold"] / "validation" / "summary.json"
    assert not summary.exists()  # the training ran without nnU-Net's final validation
    run_cli("nnUNetv2_train", ct_task.dataset_id, "3d_fullres", "0", "-tr", TRAINER, "-device", "cpu", "--val",
            env={"nnssl_results": finetuned["no_encoders"]})
    assert summary.is_file()
    out = tmp_path / "pred"
    run_cli("nnUNetv2_predict", "-i", ct_task.raw / "imagesTs", "-o", out, "-d", ct_task.dataset_id, "-c", "3d_fullres",
            "-tr", TRAINER, "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_tta",
            env={"nnssl_backbone": None, "nnssl_results": finetuned["no_encoders"]})
    images = sorted((ct_task.raw / "imagesTs").glob("*.nii.gz"))
    for image_file in images:
        prediction = sitk.ReadImage(str(out / image_file.name.replace("_0000.nii.gz", ".nii.gz")))
        assert prediction.GetSize() == sitk.ReadImage(str(image_file)).GetSize()
        assert set(np.unique(sitk.GetArrayFromImage(prediction))) <= set(LABELS.values())


def test_folds_of_one_model_start_from_one_encoder(finetuned, simmim_encoder, start, tmp_path, capsys):
    # without nnssl_run the next fold takes the encoder fold 0 started from, even with no run to discover
    trainer = start(TRAINER, 1, nnssl_run=None, nnssl_results=str(tmp_path))
    assert trainer.nnssl_settings["pretrained"]["path"] == str(simmim_encoder.resolve())
    other = make_encoder(tmp_path / "other.pth", method="simmim", seed=5)
    wide = make_encoder(tmp_path / "wide.pth", method="simmim",
                        preset=type(TINY).from_dict({**TINY.to_dict(), "name": "wide", "feature_size": 24}))
    for pretrained, message in ((other, r"Fold 1 would start from the encoder .*other.pth, but the other folds of "
                                        r".* started from .*finetune_e2e/encoder_final.pth"),
                                (wide, r"pretrained with backbone 'wide', but the model in .* was trained with 'tiny' "
                                       r"\(feature_size 12 vs 24\)")):
        capsys.readouterr()
        with pytest.raises(SystemExit):
            start(TRAINER, 1, pretrained, nnssl_backbone=None)
        assert re.search(message, capsys.readouterr().err)
    # --c with an encoder file: the fold's own nnU-Net checkpoint wins
    trainer = start(TRAINER, 0, other, continue_training=True)
    final = torch.load(finetuned["fold"] / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert all(torch.equal(v, final["network_weights"][k]) for k, v in swin_state(trainer).items())


def test_damaged_nnunet_checkpoint_is_a_clear_error(finetuned, simmim_encoder, start, tmp_path, capsys):
    trainer = start(TRAINER, 0, continue_training=True)
    final = (finetuned["fold"] / "checkpoint_final.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(final[: len(final) // 2])
    for path, message in ((tmp_path / "truncated.pth", r"checkpoint .*truncated.pth is truncated or corrupt.*Delete it"),
                          (simmim_encoder, r"encoder_final.pth is not an nnU-Net training checkpoint")):
        capsys.readouterr()
        with pytest.raises(SystemExit):
            trainer.load_checkpoint(str(path))
        assert re.search(message, capsys.readouterr().err)


def test_sigterm_saves_and_continue_restarts_the_interrupted_epoch(ct_task, tmp_path):
    """SIGTERM in epoch 1 (Slurm's time limit as nnssl_benchmark passes it on, kill, Ctrl-C in the executor): the
    trainer saves checkpoint_latest.pth after its iteration and exits 143, though nnssl_save_every would not have
    saved for 100 epochs; --c restarts epoch 1 and finishes."""
    # 6 iterations: epoch 1 is still training when the signal arrives (acted on after a training iteration)
    env = {"nnUNet_results": str(tmp_path), "nnssl_num_epochs": "3", "nnssl_iterations_per_epoch": "6",
           "nnssl_save_every": "100"}
    fold = tmp_path / ct_task.dataset / SCRATCH_MODEL / "fold_0"
    command = [str(BIN / "nnUNetv2_train"), str(ct_task.dataset_id), "3d_fullres", "0", "-tr",
               "SwinUNETR_Scratch_Trainer", "-device", "cpu"]
    log = tmp_path / "first_run.txt"
    with open(log, "w") as output:
        process = subprocess.Popen(command, env={**os.environ, **env, "PYTHONUNBUFFERED": "1"}, stdout=output,
                                   stderr=subprocess.STDOUT)
        deadline = time.time() + 600
        while "Epoch 1" not in log.read_text(encoding="utf-8") and process.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=600)
    text = log.read_text(encoding="utf-8")
    assert process.returncode == 128 + signal.SIGTERM, text[-3000:]
    assert "nnssl: SIGTERM in epoch 1: saving checkpoint_latest.pth" in text
    assert torch.load(fold / "checkpoint_latest.pth", map_location="cpu", weights_only=False)["current_epoch"] == 1
    resumed = train_without_validation(ct_task.dataset_id, "3d_fullres", "0", "-tr", "SwinUNETR_Scratch_Trainer",
                                       "-device", "cpu", "--c", env={**env, "nnssl_iterations_per_epoch": "1"})
    final = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["current_epoch"] == 3 and len(final["logging"]["train_losses"]) == 3
    assert "Epoch 1" in resumed.stdout and "Epoch 0" not in resumed.stdout
