"""Pretraining step per SSL method: time and peak memory of one optimisation step, relative to SimMIM.

One step = the method's ``loss`` on a batch built by the real view maker for its ``ViewSpec`` (random
volume region), backward, AdamW step and EMA teacher update, as in ``nnssl/pretrain/loop.py``. Every
method runs in its own subprocess (so peak memory is its own) with the same backbone, patch and batch.
Row ``pretrain_step_<method>``: ours = the method's seconds per step, baseline = SimMIM's, ratio =
SimMIM / method, both timed in the same process with interleaved steps (the issue's target: no method
slower than 3x SimMIM, i.e. ratio >= 0.33).

Row ``pretrain_local_crops_ibot``: what iBOT's 10 student-only local crops (its released Swin run,
``--local_crops_number 10``) cost per step: ours = iBOT as planned, baseline = iBOT with ``local_views=0``,
ratio = baseline / ours, timed the same way.
"""
from __future__ import annotations

import argparse
import json
import logging
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

LOG = logging.getLogger(__name__)
# quick (CPU): the paper Swin at 64^3, where the encoder, not the methods' MLP heads, dominates as in real use
SETTINGS = {False: {"preset": "paper", "patch": 64, "batch": 2, "steps": 3},
            True: {"preset": "paper", "patch": 128, "batch": 2, "steps": 5}}
# a method against itself with hyperparameters changed: row -> (method, the baseline's hyperparameters)
VARIANTS = {"pretrain_local_crops_ibot": ("ibot", {"local_views": 0})}


class _Stepper:
    """One method ready to take optimisation steps on a fixed batch made by the real view maker."""

    def __init__(self, method_name: str, preset_name: str, patch: int, batch_size: int, device: str,
                 hyperparameters: dict | None = None):
        from nnssl.data.views import ViewMaker
        from nnssl.methods.registry import build_method
        from nnssl.networks import build_encoder, get_preset
        from nnssl.pretrain.optimizer import make_adamw

        torch.manual_seed(0)
        preset = get_preset(preset_name)
        self.device = device
        self.method = build_method(method_name, build_encoder(preset), **(hyperparameters or {})).to(device)
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
    seconds, simmim_seconds = _interleaved_median_steps(method, simmim, steps)
    return {"seconds": seconds, "simmim_seconds": simmim_seconds, "peak_mib": round(peak_mib, 1)}


def measure_variant(method_name: str, baseline_hyperparameters: dict, preset_name: str, patch: int,
                    batch_size: int, steps: int, device: str) -> dict:
    """Median step time of ``method_name`` as planned and with ``baseline_hyperparameters``, interleaved."""
    planned = _Stepper(method_name, preset_name, patch, batch_size, device)
    baseline = _Stepper(method_name, preset_name, patch, batch_size, device, baseline_hyperparameters)
    planned.step()  # warm-up
    baseline.step()
    seconds, baseline_seconds = _interleaved_median_steps(planned, baseline, steps)
    return {"seconds": seconds, "baseline_seconds": baseline_seconds}


def _interleaved_median_steps(first: _Stepper, second: _Stepper, steps: int) -> tuple[float, float]:
    """Median seconds per step of ``first`` and ``second`` (both warmed up), stepping them in turn so that load
    from other processes hits both alike."""
    times = ([], [])
    for _ in range(steps):
        times[0].append(first.step())
        times[1].append(second.step())
    return statistics.median(times[0]), statistics.median(times[1])


def run(full: bool = False) -> list[dict]:
    from nnssl.methods.registry import list_methods

    settings = SETTINGS[full]
    device = "cuda" if full and torch.cuda.is_available() else "cpu"
    measured = {name: _measure_in_subprocess(name, device, full) for name in list_methods()}
    results = {name: r for name, r in measured.items() if r is not None}
    config = {**settings, "device": device, "memory": "CUDA max allocated" if device == "cuda" else "RSS growth",
              "simmim_peak_mib": results.get("simmim", {}).get("peak_mib")}
    rows = [{"name": f"pretrain_step_{name}", "ours": round(r["seconds"], 4),
             "baseline": round(r["simmim_seconds"], 4), "unit": "s/step (baseline: simmim, same process)",
             "ratio": round(r["simmim_seconds"] / r["seconds"], 2),
             "config": {**config, "peak_mib": r["peak_mib"]}}
            for name, r in results.items()]
    for row_name, (name, baseline_hyperparameters) in VARIANTS.items():
        r = _measure_in_subprocess(name, device, full, baseline_hyperparameters)
        if r is None:
            continue
        rows.append({"name": row_name, "ours": round(r["seconds"], 4), "baseline": round(r["baseline_seconds"], 4),
                     "unit": f"s/step (baseline: {name} with {json.dumps(baseline_hyperparameters)}, same process)",
                     "ratio": round(r["baseline_seconds"] / r["seconds"], 2),
                     "config": {**settings, "device": device, "baseline_hyperparameters": baseline_hyperparameters}})
    return rows


def _measure_in_subprocess(name: str, device: str, full: bool,
                           baseline_hyperparameters: dict | None = None) -> dict | None:
    """:func:`measure` (or, with ``baseline_hyperparameters``, :func:`measure_variant`) of method ``name`` in a
    fresh process, so that its peak memory is its own; None if that process fails (e.g. killed for memory on a
    shared machine), so that the other methods' rows are still written."""
    variant = ["--baseline-hyperparameters", json.dumps(baseline_hyperparameters)] if baseline_hyperparameters else []
    command = [sys.executable, "-m", "bench.bench_pretrain", "--one", name, "--device", device,
               *(["--full"] if full else []), *variant]
    output = subprocess.run(command, capture_output=True, text=True, encoding="utf-8")
    if output.returncode != 0:
        LOG.warning("bench_pretrain: %s failed (exit status %d), no row for it:\n%s", " ".join(command[2:]),
                    output.returncode, output.stderr.strip()[-2000:])
        return None
    return json.loads(output.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="paper backbone, 128^3, on the GPU")
    parser.add_argument("--one", metavar="METHOD", help="measure one method in this process and print JSON")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--baseline-hyperparameters", type=json.loads, metavar="JSON",
                        help="with --one: time the method against itself with these hyperparameters, not SimMIM")
    args = parser.parse_args()
    if args.one:
        s = SETTINGS[args.full]
        sizes = (s["preset"], s["patch"], s["batch"], s["steps"], args.device)
        print(json.dumps(measure_variant(args.one, args.baseline_hyperparameters, *sizes)
                         if args.baseline_hyperparameters else measure(args.one, *sizes)))
    else:
        for row in run(args.full):
            print(row)
