"""Issue 10: every console script answers bad input with a short, specific error and exit status 2, never a
bare traceback, and leaves every file that existed before the call unchanged.

One parametrized case per kind of bad input and tool. The entry points run in this process (their ``main``,
or nnU-Net's ``run_training_entry`` for the trainers), so the whole table takes seconds; the real console
scripts are exercised by the other test modules. The suite prints how many cases were checked.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import SCRATCH_MODEL
from nnssl.data.synthetic import write_task

RAW_ONLY_ID = 930  # in $nnUNet_raw, never preprocessed


@dataclass
class Case:
    id: str
    tool: str  # console script name
    argv: list[str]
    message: str  # substring the error must contain (the problem named)
    env: dict[str, str | None] = field(default_factory=dict)
    setup: Callable[[Path], None] | None = None  # gets the case's scratch folder; may add files to argv paths


def _entry(tool: str) -> Callable[[list[str]], int]:
    if tool == "nnUNetv2_train":
        from nnunetv2.run.run_training import run_training_entry

        def train(argv: list[str]) -> int:
            saved = sys.argv
            sys.argv = ["nnUNetv2_train", *argv]
            try:
                return run_training_entry()
            finally:
                sys.argv = saved

        return train
    module = {"nnssl_import": "import_encoder"}.get(tool, tool.removeprefix("nnssl_"))
    return __import__(f"nnssl.cli.{module}", fromlist=["main"]).main


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _image(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))


def _btcv(root: Path, label: np.ndarray) -> None:
    _image(root / "RawData/Training/img/img0001.nii.gz", np.zeros((8, 8, 8), np.int16))
    _image(root / "RawData/Training/label/label0001.nii.gz", label)


def _two_bad_volumes(root: Path) -> None:
    _image(root / "raw/flat.nii.gz", np.zeros((16, 16), np.int16))
    _image(root / "raw/constant.nii.gz", np.full((16, 16, 16), -1000, np.int16))


def _msd_with_broken_json(root: Path) -> None:
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir()
    _write(root / "dataset.json", b'{"labels": {"0": "background",')  # cut off mid-download


def _foreign_checkpoint(root: Path) -> None:
    torch.save({"model": {"weight": torch.zeros(2)}}, root / "foreign.pth")


def _truncated_encoder(root: Path) -> None:
    from nnssl.checkpoints import save_encoder
    from nnssl.networks import build_encoder, get_preset

    preset = get_preset("tiny")
    save_encoder(root / "full.pth", build_encoder(preset), {"backbone": preset.to_dict(), "method": "dino"})
    _write(root / "truncated.pth", (root / "full.pth").read_bytes()[:5000])


def _existing_run(root: Path) -> None:
    from nnssl.pretrain.config import resolve_config

    config = resolve_config("simmim", ["501"], {"backbone": "tiny", "device": "cpu", "run": "taken"})
    run = Path(__import__("os").environ["nnssl_results"]) / "simmim" / "taken"
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps(config.to_dict()))


def _owned_run(host: str, pid: int, process_start: str | None) -> Callable[[Path], None]:
    """A resumable run folder "busy" whose run.owner.json names a live owner (heartbeat: now)."""
    import time

    from nnssl.pretrain.config import resolve_config

    def setup(root: Path) -> None:
        config = resolve_config("simmim", ["501"], {"backbone": "tiny", "device": "cpu", "patch_size": [32, 32, 32],
                                                    "run": "busy"})
        run = Path(__import__("os").environ["nnssl_results"]) / "simmim" / "busy"
        run.mkdir(parents=True, exist_ok=True)
        (run / "config.json").write_text(json.dumps(config.to_dict()))
        (run / "run.owner.json").write_text(json.dumps({"host": host, "pid": pid, "process_start": process_start,
                                                        "heartbeat": time.time(), "token": "owner"}))

    return setup


def _this_process() -> tuple[str, int, str | None]:
    import os
    import socket

    from nnssl.pretrain.run_lock import process_start_time

    return socket.gethostname(), os.getpid(), process_start_time(os.getpid())


def _damaged_model_plans(trainer: str) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        model = root / "results" / "Dataset990_SynthCT" / f"{trainer}__nnUNetPlans__3d_fullres"
        _write(model / "plans.json", b'{"dataset_name": "Dataset990_SynthCT", "configurations": {"3d_fu')
    return damage


def _corrupt_latest(root: Path) -> None:
    run = Path(__import__("os").environ["nnssl_results"]) / "simmim" / "broken"
    _write(run / "checkpoint_latest.pth", b"PK\x03\x04 truncated")


TINY = ["--backbone", "tiny", "--device", "cpu", "--patch-size", "32", "32", "32"]
CT = "990"
CASES = [
    # nnssl_pretrain
    Case("pretrain-no-results-var", "nnssl_pretrain", ["-m", "simmim", "-d", "501", *TINY], "nnssl_results is not set",
         env={"nnssl_results": None}),
    Case("pretrain-unknown-method", "nnssl_pretrain", ["-m", "mae", "-d", "501"], "Unknown SSL method 'mae'"),
    Case("pretrain-unknown-dataset", "nnssl_pretrain", ["-m", "simmim", "-d", "444", *TINY], "No dataset '444'"),
    Case("pretrain-not-preprocessed", "nnssl_pretrain", ["-m", "simmim", "-d", str(RAW_ONLY_ID), *TINY],
         f"nnUNetv2_plan_and_preprocess -d {RAW_ONLY_ID}"),
    Case("pretrain-bad-dataset-name", "nnssl_pretrain", ["-m", "simmim", "-d", "liver", *TINY],
         "neither an nnU-Net dataset id"),
    Case("pretrain-unknown-setting", "nnssl_pretrain", ["-m", "simmim", "-d", "501", "--plans-override", "lrate=1"],
         "unknown setting 'lrate'"),
    Case("pretrain-unknown-hyperparameter", "nnssl_pretrain",
         ["-m", "dino", "-d", "501", "--plans-override", "method.mask_ratio=0.5"], "no hyperparameter 'mask_ratio'"),
    Case("pretrain-unreadable-override", "nnssl_pretrain", ["-m", "simmim", "-d", "501", "--plans-override",
                                                             "grad_clip=strong"], "cannot read 'strong'"),
    Case("pretrain-patch-not-32", "nnssl_pretrain", ["-m", "simmim", "-d", "501", "--patch-size", "48", "48", "40"],
         "multiple of 32"),
    Case("pretrain-unknown-backbone", "nnssl_pretrain", ["-m", "simmim", "-d", "501", "--backbone", "huge",
                                                          "--device", "cpu"], "Unknown backbone preset 'huge'"),
    Case("pretrain-no-cuda", "nnssl_pretrain", ["-m", "simmim", "-d", "501", "--device", "cuda"],
         "CUDA is not available"),
    Case("pretrain-zero-epochs", "nnssl_pretrain", ["-m", "simmim", "-d", "501", "--epochs", "0"], "epochs=0"),
    Case("pretrain-run-exists", "nnssl_pretrain", ["-m", "simmim", "-d", "501", *TINY, "--run", "taken"],
         "already exists", setup=_existing_run),
    Case("pretrain-resume-changed", "nnssl_pretrain", ["-m", "simmim", "-d", "501", *TINY, "--run", "taken",
                                                        "--resume", "--lr", "0.3"], "keeps its settings",
         setup=_existing_run),
    Case("pretrain-run-owned-on-other-host", "nnssl_pretrain", ["-m", "simmim", "-d", "501", *TINY, "--run", "busy",
                                                                 "--resume"], "node-b refreshed its heartbeat",
         setup=_owned_run("node-b", 4242, "1")),
    Case("pretrain-run-owned-on-this-host", "nnssl_pretrain", ["-m", "simmim", "-d", "501", *TINY, "--run", "busy",
                                                                "--resume"], "is still running",
         setup=lambda root: _owned_run(*_this_process())(root)),
    Case("pretrain-corrupt-checkpoint", "nnssl_pretrain", ["-m", "simmim", "-d", "501", *TINY, "--run", "broken",
                                                            "--resume"], "corrupt or truncated", setup=_corrupt_latest),
    # nnssl_prepare_corpus
    Case("corpus-missing-folder", "nnssl_prepare_corpus", ["-i", "{tmp}/nowhere", "-d", "540", "-n", "X"],
         "does not exist"),
    Case("corpus-no-volumes", "nnssl_prepare_corpus", ["-i", "{tmp}", "-d", "540", "-n", "X"], "No volumes found"),
    Case("corpus-only-bad-volumes", "nnssl_prepare_corpus", ["-i", "{tmp}/raw", "-d", "541", "-n", "Bad",
                                                              "--no-preprocess", "-np", "1"],
         "Only 0 usable", setup=_two_bad_volumes),
    Case("corpus-id-out-of-range", "nnssl_prepare_corpus", ["-i", "{tmp}", "-d", "1000", "-n", "X"],
         "between 1 and 999"),
    Case("corpus-bad-name", "nnssl_prepare_corpus", ["-i", "{tmp}", "-d", "542", "-n", "my corpus"],
         "may only contain"),
    Case("corpus-id-taken", "nnssl_prepare_corpus", ["-i", "{tmp}", "-d", CT, "-n", "Other"], "already used by"),
    Case("corpus-no-raw-var", "nnssl_prepare_corpus", ["-i", "{tmp}", "-d", "543", "-n", "X"],
         "nnUNet_raw is not set", env={"nnUNet_raw": None}),
    Case("corpus-bad-spacing", "nnssl_prepare_corpus", ["-i", "{tmp}", "-d", "543", "-n", "X", "--spacing", "2", "x",
                                                         "2"], "--spacing takes three numbers"),
    # nnssl_align_plans and the trainers' seed and encoder knobs
    Case("align-unknown-corpus", "nnssl_align_plans", ["-d", CT, "--corpus", "444"], "444"),
    Case("align-nnunet-identifier", "nnssl_align_plans", ["-d", CT, "-pl", "nnUNetPlans"], "own identifier"),
    Case("train-negative-seed", "nnUNetv2_train", [CT, "3d_fullres", "1", "-tr", "SwinUNETR_Scratch_Trainer", "-device",
                                                   "cpu"], "nnssl_seed='-1' must be a whole number",
         env={"nnssl_seed": "-1"}),
    Case("train-unknown-encoder", "nnUNetv2_train", [CT, "3d_fullres", "1", "-tr", "SwinUNETR_DINO_Trainer", "-device",
                                                      "cpu"], "nnssl_encoder='ema' must be one of",
         env={"nnssl_encoder": "ema"}),
    # nnssl_fewshot
    Case("fewshot-unknown-dataset", "nnssl_fewshot", ["444", "--shots", "1"], "444"),
    Case("fewshot-too-many-shots", "nnssl_fewshot", [CT, "--shots", "50"], "50"),
    Case("fewshot-not-preprocessed", "nnssl_fewshot", [str(RAW_ONLY_ID), "--shots", "1"],
         f"nnUNetv2_plan_and_preprocess -d {RAW_ONLY_ID}"),
    Case("fewshot-no-preprocessed-var", "nnssl_fewshot", [CT, "--shots", "1"], "nnUNet_preprocessed",
         env={"nnUNet_preprocessed": None}),
    Case("fewshot-bad-base-fold", "nnssl_fewshot", [CT, "--shots", "1", "--folds", "9"], "9"),
    # nnssl_cka
    Case("cka-missing-folder", "nnssl_cka", ["{tmp}/nope", "{tmp}/nope2", "-o", "{tmp}/out"], "nope"),
    Case("cka-folder-without-model", "nnssl_cka", ["{tmp}", "{tmp}", "-o", "{tmp}/out"], "{tmp}"),
    Case("cka-missing-fold", "nnssl_cka", ["{scratch}:3", "{scratch}:0", "-o", "{tmp}/out"], "fold_3"),
    Case("cka-patch-not-multiple", "nnssl_cka", ["{scratch}", "{scratch}", "--patch-size", "40", "64", "64",
                                                 "-device", "cpu", "-o", "{tmp}/out"], "multiples of 32"),
    Case("cka-patch-one-voxel-bottleneck", "nnssl_cka", ["{scratch}", "{scratch}", "--patch-size", "32", "32", "32",
                                                         "-device", "cpu", "-o", "{tmp}/out"], "at least 64"),
    Case("cka-too-few-distinct-patches", "nnssl_cka", ["{scratch}", "{scratch}", "--cases", "1", "--patch-size",
                                                       "512", "512", "512", "-device", "cpu", "-o", "{tmp}/out"],
         "1 case(s) give 1 distinct patch(es)"),
    # nnssl_probe (the encoder is checked before any data is read)
    Case("probe-unknown-encoder", "nnssl_probe", ["dinoo", "-d", CT, "-o", "{tmp}/p"], "'dinoo' is neither"),
    Case("probe-unfinished-run", "nnssl_probe", ["{tmp}/run", "-d", CT, "-o", "{tmp}/p"],
         "encoder_teacher_final.pth", setup=lambda tmp: _write(tmp / "run" / "config.json", b'{"method": "dino"}')),
    Case("probe-fold-out-of-range", "nnssl_probe", ["random", "-d", CT, "--fold", "7", "-o", "{tmp}/p"], "--fold 7"),
    Case("probe-too-many-shots", "nnssl_probe", ["random", "-d", CT, "--shots", "50", "-o", "{tmp}/p"], "--shots 50"),
    Case("probe-not-preprocessed", "nnssl_probe", ["random", "-d", str(RAW_ONLY_ID), "-o", "{tmp}/p"],
         str(RAW_ONLY_ID)),
    Case("pretrain-probe-every-without-probe", "nnssl_pretrain", ["-m", "simmim", "-d", CT, "--probe-every", "5"],
         "--probe-every needs --probe"),
    # nnssl_report
    Case("report-no-results-var", "nnssl_report", ["-o", "{tmp}/r"], "nnUNet_results", env={"nnUNet_results": None}),
    Case("report-unknown-dataset", "nnssl_report", ["444", "-o", "{tmp}/r"], "444"),
    # nnssl_convert
    Case("convert-unknown-task", "nnssl_convert", ["KiTS", "{tmp}", "-o", "{tmp}/raw"], "KiTS"),
    Case("convert-broken-dataset-json", "nnssl_convert", ["Liver", "{tmp}", "-o", "{tmp}/raw"],
         "dataset.json is not valid JSON", setup=_msd_with_broken_json),
    Case("convert-missing-source", "nnssl_convert", ["BTCV", "{tmp}/nowhere", "-o", "{tmp}/raw"], "nowhere"),
    Case("convert-incomplete-download", "nnssl_convert", ["BTCV", "{tmp}", "-o", "{tmp}/raw"], "Training"),
    Case("convert-label-values", "nnssl_convert", ["BTCV", "{tmp}", "-o", "{tmp}/raw"], "99",
         setup=lambda root: _btcv(root, np.full((8, 8, 8), 99, np.uint8))),
    Case("convert-geometry-mismatch", "nnssl_convert", ["BTCV", "{tmp}", "-o", "{tmp}/raw"], "do not match",
         setup=lambda root: _btcv(root, np.zeros((8, 8, 6), np.uint8))),
    # nnssl_benchmark
    Case("benchmark-unknown-task", "nnssl_benchmark", ["--tasks", "KiTS", "--dry-run"], "KiTS"),
    Case("benchmark-unknown-method", "nnssl_benchmark", ["--methods", "mae", "--dry-run"], "mae"),
    Case("benchmark-missing-plan", "nnssl_benchmark", ["--plan", "{tmp}/plan.json", "--dry-run"], "plan.json"),
    # nnssl_export / nnssl_import
    Case("export-missing-file", "nnssl_export", ["{tmp}/encoder_final.pth", "-o", "{tmp}/out.pt"], "encoder_final.pth"),
    Case("export-foreign-file", "nnssl_export", ["{tmp}/foreign.pth", "-o", "{tmp}/out.pt"], "nnssl_import",
         setup=_foreign_checkpoint),
    Case("import-missing-file", "nnssl_import", ["{tmp}/model_swinvit.pt", "-o", "{tmp}/e.pth"], "model_swinvit.pt"),
    Case("import-truncated-file", "nnssl_import", ["{tmp}/truncated.pth", "-o", "{tmp}/e.pth"], "truncated.pth",
         setup=_truncated_encoder),
    Case("import-unknown-layout", "nnssl_import", ["{tmp}/foreign.pth", "-o", "{tmp}/e.pth"], "foreign.pth",
         setup=_foreign_checkpoint),
    # nnssl_make_synthetic
    Case("synthetic-no-raw-var", "nnssl_make_synthetic", ["task", "-d", "931"], "nnUNet_raw is not set",
         env={"nnUNet_raw": None}),
    Case("synthetic-bad-id", "nnssl_make_synthetic", ["task", "-d", "0"], "between 1 and 999"),
    # trainers under nnUNetv2_train (each case trains into its own nnUNet_results, see test_bad_input)
    Case("train-unknown-backbone", "nnUNetv2_train", [CT, "3d_fullres", "1", "-tr", "SwinUNETR_Scratch_Trainer",
                                                       "-device", "cpu"], "Unknown backbone preset 'large'",
         env={"nnssl_backbone": "large"}),
    Case("train-bad-knob", "nnUNetv2_train", [CT, "3d_fullres", "2", "-tr", "SwinUNETR_Scratch_Trainer", "-device",
                                               "cpu"], "nnssl_iterations_per_epoch", env={"nnssl_iterations_per_epoch": "-3"}),
    Case("train-no-results-var", "nnUNetv2_train", [CT, "3d_fullres", "3", "-tr", "SwinUNETR_Scratch_Trainer",
                                                     "-device", "cpu"], "nnUNet_results is not set",
         env={"nnUNet_results": None}),
    Case("train-2d-configuration", "nnUNetv2_train", [CT, "2d", "1", "-tr", "SwinUNETR_Scratch_Trainer", "-device",
                                                       "cpu"], "3D configuration"),
    Case("train-missing-encoder", "nnUNetv2_train", [CT, "3d_fullres", "4", "-tr", "SwinUNETR_iBOT_Trainer", "-device",
                                                      "cpu"], "nnssl_pretrain -m ibot", env={"nnssl_run": "never_made"}),
    Case("train-foreign-weights", "nnUNetv2_train", [CT, "3d_fullres", "1", "-tr", "SwinUNETR_DINO_Trainer", "-device",
                                                      "cpu", "-pretrained_weights", "{tmp}/foreign.pth"], "nnssl_import",
         setup=_foreign_checkpoint),
    Case("train-truncated-weights", "nnUNetv2_train", [CT, "3d_fullres", "2", "-tr", "SwinUNETR_DINO_Trainer",
                                                        "-device", "cpu", "-pretrained_weights", "{tmp}/truncated.pth"],
         "truncated", setup=_truncated_encoder),
    Case("train-imported-without-encoder", "nnUNetv2_train", [CT, "3d_fullres", "0", "-tr",
                                                               "SwinUNETR_Imported_Trainer", "-device", "cpu"],
         "-pretrained_weights FILE to nnUNetv2_train, or set nnssl_encoder_file=FILE"),
    Case("report-dataset-option", "nnssl_report", ["-d", "444", "-o", "{tmp}/r"], "No dataset '444'"),
    Case("pretrain-missing-plan-file", "nnssl_pretrain", ["-m", "simmim", "-d", "501", "--plan", "{tmp}/my.json"],
         "--plan {tmp}/my.json does not exist"),
    Case("train-damaged-model-plans", "nnUNetv2_train", [CT, "3d_fullres", "1", "-tr", "SwinUNETR_Scratch_Trainer",
                                                          "-device", "cpu"], "plans.json is damaged",
         setup=_damaged_model_plans("SwinUNETR_Scratch_Trainer")),
    Case("train-baseline-damaged-model-plans", "nnUNetv2_train", [CT, "3d_fullres", "1", "-tr",
                                                                   "nnUNetTrainerAdam_nnsslSchedule", "-device", "cpu"],
         "plans.json is damaged", setup=_damaged_model_plans("nnUNetTrainerAdam_nnsslSchedule")),
    Case("train-fold-not-in-splits", "nnUNetv2_train", [CT, "3d_fullres", "17", "-tr", "SwinUNETR_Scratch_Trainer",
                                                         "-device", "cpu"], "nnssl_fewshot"),
]


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def world(ct_task, trained_scratch, pretrain_corpus, nnunet_env):
    """The session's datasets, trained model and corpus, plus a raw-only dataset."""
    write_task(nnunet_env.raw, RAW_ONLY_ID, "RawOnly", num_training=2, seed=3)
    return nnunet_env


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, world, tmp_path, monkeypatch, capsys):
    if case.setup is not None:
        case.setup(tmp_path)
    env = dict(case.env)
    if case.tool == "nnUNetv2_train":  # a refused training still makes its fold folder: keep the shared model clean
        env.setdefault("nnUNet_results", str(tmp_path / "results"))
    for key, value in env.items():
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    scratch = world.results / "Dataset990_SynthCT" / SCRATCH_MODEL
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{scratch}", str(scratch)) for a in case.argv]
    message = case.message.replace("{tmp}", str(tmp_path))
    before = _snapshot(Path(world.raw).parent) | _snapshot(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        _entry(case.tool)(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert message in err, err
    assert "Traceback" not in err
    after = _snapshot(Path(world.raw).parent) | _snapshot(tmp_path)
    changed = [path for path, stamp in before.items() if after.get(path) != stamp]
    assert changed == [], f"{case.tool} changed files that existed before: {changed}"


def test_there_are_at_least_40_cases():
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)
