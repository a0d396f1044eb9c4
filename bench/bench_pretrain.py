"""Pretraining step per SSL method: time and peak memory of one optimisation step, relative to SimMIM.

One step = the method's ``loss`` on a batch built by the real view maker for its ``ViewSpec`` (random
volume region), backward, AdamW step and EMA teacher update, as in ``nnssl/pretrain/loop.py``. Every
method runs in its own subprocess (so peak memory is its own) with the same backbone, patch and batch.
Row ``pretrain_step_<method>``: ours = the method's seconds per step, baseline = SimMIM's, ratio =
SimMIM / method, both timed in the same process with interleaved steps (the issue's target: no method
slower than 3x SimMIM, i.e. ratio >= 0.33).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

# quick (CPU): the paper Swin at 64^3, where the encoder, not the methods' MLP heads, dominates as in real use
SETTINGS = {False: {"preset": "paper", "patch": 64, "batch": 2, "steps": 3},
            True: {"preset": "paper", "patch": 128, "batch": 2, "steps": 5}}


class _Stepper:
    """One method ready to take optimisation steps on a fixed batch made by the real view maker."""

    def __init__(self, method_name: str, preset_name: str, patch: int, batch_size: int, device: str):
        from nnssl.data.views import ViewMaker
        from nnssl.methods.registry import build_method
        from nnssl.networks import build_encoder, get_preset
        from nnssl.pretrain.optimizer import make_adamw

        torch.manual_seed(0)
        preset = get_preset(preset_name)
        self.device = device
        self.method = build_method(method_name, build_encoder(preset)).to(device)
        self.optimizer = make_adamw(self.method, torch.device(device), lr=1e-4)
        views = ViewMaker(self.method.view_spec(), (patch,) * 3, preset.patch_size)
        rng = np.random.default_rng(0)
        region = torch.randn(1, *views.region_size)
        samples = [views(region, rng) for _ in range(batch_size)]
        self.batch = {k: v.to(device) for k, v in views.collate(samples).items()}

    def step(self) -> float:
        from nnssl.networks.heads import update_momentum

        start = time.perf_counter()
        self.method.on_step(1.0)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device == "cuda"):
            loss = self.method.loss(self.batch)["loss"]
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        for student, teacher in self.method.ema_pairs():
            update_momentum(student, teacher, 0.996)
        if self.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start


def measure(method_name: str, preset_name: str, patch: int, batch_size: int, steps: int, device: str) -> dict:
    """Peak memory of ``method_name`` alone, then its median step time and SimMIM's, interleaved step by step
    in this process so that load from other processes hits both alike."""
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    method = _Stepper(method_name, preset_name, patch, batch_size, device)
    method.step()  # warm-up
    if device == "cuda":
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:  # ru_maxrss is in KiB on Linux: the process's growth while building and stepping the method
        peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    simmim = _Stepper("simmim", preset_name, patch, batch_size, device)
    simmim.step()
    times = {"method": [], "simmim": []}
    for _ in range(steps):
        times["method"].append(method.step())
        times["simmim"].append(simmim.step())
    return {"seconds": statistics.median(times["method"]), "simmim_seconds": statistics.median(times["simmim"]),
            "peak_mib": round(peak_mib, 1)}


def run(full: bool = False) -> list[dict]:
    from nnssl.methods.registry import list_methods

    settings = SETTINGS[full]
    device = "cuda" if full and torch.cuda.is_available() else "cpu"
    results = {}
    for name in list_methods():
        command = [sys.executable, "-m", "bench.bench_pretrain", "--one", name, "--device", device,
                   *(["--full"] if full else [])]
        output = subprocess.run(command, capture_output=True, text=True, encoding="utf-8", check=True)
        results[name] = json.loads(output.stdout.strip().splitlines()[-1])
    config = {**settings, "device": device, "memory": "CUDA max allocated" if device == "cuda" else "RSS growth"}
    return [{"name": f"pretrain_step_{name}", "ours": round(r["seconds"], 4), "baseline": round(r["simmim_seconds"], 4),
             "unit": "s/step (baseline: simmim, same process)", "ratio": round(r["simmim_seconds"] / r["seconds"], 2),
             "config": {**config, "peak_mib": r["peak_mib"], "simmim_peak_mib": results["simmim"]["peak_mib"]}}
            for name, r in results.items()]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="paper backbone, 128^3, on the GPU")
    parser.add_argument("--one", metavar="METHOD", help="measure one method in this process and print JSON")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.one:
        s = SETTINGS[args.full]
        print(json.dumps(measure(args.one, s["preset"], s["patch"], s["batch"], s["steps"], args.device)))
    else:
        for row in run(args.full):
            print(row)
