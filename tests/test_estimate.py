"""nnssl_benchmark --estimate: GPU-hours per job kind, measured where runs exist, else the plan's estimates."""
from __future__ import annotations

import json

from nnssl.benchmark.driver import run_benchmark
from nnssl.benchmark.study import load_study

from conftest import run_cli


def test_estimate_uses_the_plan_then_measured_runs(tmp_path, monkeypatch):
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnssl_results"):
        (tmp_path / name).mkdir()
        monkeypatch.setenv(name, str(tmp_path / name))
    text = run_cli("nnssl_benchmark", "--estimate", "--tasks", "CHAOS", "--methods", "smit", "scratch", "--folds", "0",
                   "--shots", "all").stdout
    assert _row(text, "finetune") == ["2", "60-100", "plan estimate (estimates.finetune_run)"]
    total = _row(text, "total")  # the plan gives no pretraining estimate
    assert total[1] == "60-100" and total[2].startswith("without pretrain")
    # a finished fine-tuning (nnU-Net's log: 2 epochs of 36 s) and a pretraining run half way (1 s per step)
    plans = load_study().plans_identifier
    fold = tmp_path / "nnUNet_results" / "Dataset515_CHAOS" / f"SwinUNETR_Scratch_Trainer__{plans}__3d_fullres" / "fold_1"
    fold.mkdir(parents=True)
    (fold / "training_log_2026_1_1_00_00_00.txt").write_text("Epoch time: 30.0 s\nEpoch time: 42.0 s\n")
    run = tmp_path / "nnssl_results" / "smit" / "paper_d501"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"epochs": 100, "steps_per_epoch": 36}))
    (run / "log.csv").write_text("step,loss,time\n1,2.0,1000.0\n11,1.5,1010.0\n")
    text = run_benchmark(tasks=["CHAOS"], methods=["smit", "scratch"], folds=[0], shots=["all"],
                         action="estimate").text
    assert _row(text, "finetune") == ["2", "20", "measured: 10.00 h per run, mean of 1 finished run(s)"]
    assert _row(text, "pretrain")[:2] == ["1", "1"]  # 3,600 steps x 1 s
    assert _row(text, "total")[1] == "21"


def _row(text: str, kind: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(kind + " "))
    count, hours, basis = line[len(kind):].split(maxsplit=2)
    return [count, hours, basis]
