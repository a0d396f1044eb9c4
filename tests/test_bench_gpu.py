"""The GPU benchmark script (``make bench ARGS=--full``, ``bench/bench_gpu.py``) without a GPU: it refuses to run
its full setting, and its dry run on the CPU goes through every measurement with tiny sizes."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

import bench.bench_gpu as bench_gpu
import bench.run

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")


def test_full_benchmark_refuses_to_run_without_cuda(capsys, tmp_path):
    results = tmp_path / "results.json"
    with pytest.raises(SystemExit) as exit_info:
        bench.run.main(["--full", "--results", str(results)])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in error
    assert "no CUDA device" in error and "python -m bench.bench_gpu --device cpu" in error
    assert not results.exists()


def test_dry_run_measures_every_row_and_writes_them(monkeypatch, capsys, tmp_path, one_torch_thread):
    # the dry-run sizes with one variant, one method and one step per memory probe: every function of the script,
    # in a fraction of the time
    sizes = replace(bench_gpu.SIZES["cpu"], variants={"fp32": {"precision": "fp32"}}, methods=["simmim"],
                    memory_steps=1)
    monkeypatch.setitem(bench_gpu.SIZES, "cpu", sizes)
    results = tmp_path / "results.json"
    assert bench_gpu.main(["--device", "cpu", "--results", str(results)]) == 0
    rows = json.loads(results.read_text(encoding="utf-8"))
    expected = bench_gpu.row_names(sizes)
    assert expected == ["gpu_swin_step_tiny_64_fp32", "gpu_swin_memory_tiny_64_fp32", "gpu_pretrain_step_simmim",
                        "gpu_inference_sliding_window_tiny_64", "gpu_swin_memory_checkpointing_tiny_64"]
    assert sorted(row["name"] for row in rows) == sorted(expected)
    bench.run.check_rows("bench.bench_gpu", rows)
    written = (tmp_path / "RESULTS.md").read_text(encoding="utf-8")  # rewritten beside results.json, as make bench does
    assert all(f"| {name} |" in written for name in expected)
    for row in rows:
        assert row["ours"] > 0 and row["baseline"] > 0, row
        assert row["config"]["device"] == "cpu" and row["config"]["machine"]["gpu"] is None
    table = capsys.readouterr().out
    assert all(name in table for name in expected)
    section = "\n".join(bench_gpu.results_section(rows))
    assert "Not measured yet" in section and "`gpu_swin_step_paper_128_compiled`" in section
