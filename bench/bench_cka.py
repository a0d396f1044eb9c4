"""CKA benchmark (issue 9): nnssl_cka's streaming minibatch CKA versus a direct computation.

Both compute the same estimator, minibatch linear CKA with the unbiased HSIC (Nguyen, Raghu & Kornblith
2021), between every layer of one SwinUNETR and every layer of another (15 x 15 pairs, the nnssl_cka
heatmap), for N patches in minibatches of 32:

- ours (``nnssl.analysis.cka.MinibatchCKA``): activations arrive one minibatch at a time and are
  dropped after use; each layer's Gram matrix is formed once per minibatch, and the HSIC of all
  30 x 30 layer pairs comes from two matrix products.
- baseline, direct: every patch's activations are kept (as a script that first collects the features,
  then analyses them), and for each layer pair and minibatch the Gram matrices ``X X^T``, ``Y Y^T`` are
  formed and ``HSIC_1`` is evaluated from them with the matrix formula (Song et al. 2012, eq. 5), as in
  Kornblith et al.'s reference code ``cka(gram_linear(x), gram_linear(y))``.

Both evaluate the same estimator, so their values can agree to 1e-5. One Gram matrix over all N patches
(full-data debiased CKA) is a different estimate of the same CKA, equal to ours only when one minibatch
holds all patches; no exact full-data computation has memory flat in N.

The activations are synthetic, with the sizes of the real layers (a SwinUNETR of the preset is run once on
one patch, pooled as nnssl_cka pools), so the figures time the CKA computation and not the networks.
Time: seconds of CKA computation (activation generation excluded; best of 3 interleaved runs). Memory:
peak memory the computation adds, in MB, measured in a fresh process (CPU, Linux: peak resident size
after resetting it) or ``torch.cuda.max_memory_allocated`` (GPU).
The two results must agree to 1e-5, else the benchmark fails.

Run alone: ``python -m bench.bench_cka [--full]``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from nnssl.analysis.cka import DEFAULT_BATCH_SIZE, MinibatchCKA, gram_linear, hsic1, minibatch_sizes

QUICK = {"preset": "tiny", "patch": (64, 64, 64), "patches": (50, 100, 200, 400)}
FULL = {"preset": "paper", "patch": (128, 128, 128), "patches": (50, 100, 200, 400, 800)}
LATENT = 32  # rank of the shared signal behind the synthetic activations (gives non-trivial CKA values)
TOLERANCE = 1e-5
REPEATS = 3
SEED = 0
REPO = Path(__file__).resolve().parent.parent  # the memory probe runs `python -m bench.bench_cka` from here


def layer_sizes(preset: str, patch: tuple[int, int, int], pool: int) -> list[int]:
    """Features per patch of each nnssl_cka layer (pooled, flattened) of a SwinUNETR of ``preset``."""
    # imported here, not at the top: the memory probe processes need only torch and the CKA math
    from nnssl.analysis.activations import LAYER_GROUPS, LayerTaps
    from nnssl.networks import build_swinunetr, get_preset

    network = build_swinunetr(get_preset(preset), in_channels=1, out_channels=2).eval()
    features = LayerTaps(network, LAYER_GROUPS["all"], pool)(torch.zeros(1, 1, *patch))
    return [f.shape[1] for f in features]


class SyntheticActivations:
    """Activations of two networks (``2 * len(sizes)`` layers) for minibatch ``index``: each layer a fixed
    random projection of a per-patch latent plus noise, so layers share signal as real ones do."""

    def __init__(self, sizes: list[int], device: torch.device):
        generator = torch.Generator().manual_seed(SEED)
        self.projections = [torch.randn(LATENT, p, generator=generator).to(device) for p in sizes + sizes]
        self.device = device

    def batch(self, index: int, size: int) -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(SEED + 1 + index)
        latent = torch.randn(size, LATENT, generator=generator).to(self.device)
        return [latent @ w + torch.randn(size, w.shape[1], generator=generator).to(self.device)
                for w in self.projections]


def streaming(activations: SyntheticActivations, sizes: list[int]) -> tuple[torch.Tensor, float]:
    """Ours: one accumulator over all layers of both networks; returns (cross-network CKA block, seconds)."""
    layers = len(activations.projections)
    accumulator = MinibatchCKA(layers)
    seconds = 0.0
    for index, size in enumerate(sizes):
        features = activations.batch(index, size)
        start = _now(activations.device)
        accumulator.update(features)
        seconds += _now(activations.device) - start
        del features  # as in nnssl_cka: a minibatch's activations are dropped once accumulated
    return accumulator.result()[: layers // 2, layers // 2:], seconds


def direct(activations: SyntheticActivations, sizes: list[int]) -> tuple[torch.Tensor, float]:
    """Baseline: keep every activation, then per layer pair and minibatch Gram matrices and HSIC_1."""
    stored = [activations.batch(index, size) for index, size in enumerate(sizes)]
    half = len(activations.projections) // 2
    result = torch.zeros(half, half, dtype=torch.float64)
    start = _now(activations.device)
    for a in range(half):
        for b in range(half):
            xy = xx = yy = 0.0
            for features in stored:
                k, l = gram_linear(features[a]), gram_linear(features[half + b])
                xy, xx, yy = xy + hsic1(k, l), xx + hsic1(k, k), yy + hsic1(l, l)
            result[a, b] = (xy / torch.sqrt(xx * yy)).cpu()
    return result, _now(activations.device) - start


METHODS = {"ours": streaming, "baseline": direct}


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _status_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS: resident now, VmHWM: peak resident) in MB."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":")) / 1024


def peak_memory_mb(method: str, sizes: list[int], patches: int, device: torch.device) -> float:
    """Peak memory the computation adds: CUDA allocator peak, or on CPU the peak RSS of a fresh process."""
    if device.type == "cuda":
        activations = SyntheticActivations(sizes, device)
        torch.cuda.synchronize(device)
        baseline = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        METHODS[method](activations, minibatch_sizes(patches, DEFAULT_BATCH_SIZE))
        return (torch.cuda.max_memory_allocated(device) - baseline) / 2**20
    command = [sys.executable, "-m", "bench.bench_cka", "--peak-rss", method, str(patches), json.dumps(sizes)]
    output = subprocess.run(command, capture_output=True, text=True, check=True, cwd=REPO).stdout
    return float(output.strip().splitlines()[-1])


def _measure_rss_here(method: str, patches: int, sizes: list[int]) -> float:
    activations = SyntheticActivations(sizes, torch.device("cpu"))
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # Linux: reset the peak (VmHWM) to the current resident size, dropping import peaks
    before = _status_mb("VmRSS")
    METHODS[method](activations, minibatch_sizes(patches, DEFAULT_BATCH_SIZE))
    return _status_mb("VmHWM") - before


def run(full: bool) -> list[dict]:
    from nnssl.analysis.activations import DEFAULT_POOL  # the pooling nnssl_cka applies by default

    setting = FULL if full else QUICK
    device = torch.device("cuda" if full and torch.cuda.is_available() else "cpu")
    torch.manual_seed(SEED)
    sizes = layer_sizes(setting["preset"], setting["patch"], DEFAULT_POOL)
    rows = []
    for patches in setting["patches"]:
        batches = minibatch_sizes(patches, DEFAULT_BATCH_SIZE)
        activations = SyntheticActivations(sizes, device)
        # best of REPEATS interleaved runs: a busy machine only ever adds time, and interleaving spreads
        # each method's runs over the same stretch of time
        matrices, seconds = {}, {name: [] for name in METHODS}
        for _ in range(REPEATS):
            for name, method in METHODS.items():
                matrices[name], elapsed = method(activations, batches)
                seconds[name].append(elapsed)
        ours_s, baseline_s = min(seconds["ours"]), min(seconds["baseline"])
        difference = float((matrices["ours"] - matrices["baseline"]).abs().max())
        if difference > TOLERANCE:
            raise RuntimeError(f"streaming and direct CKA differ by {difference:.2e} at {patches} patches")
        config = {"preset": setting["preset"], "patch": list(setting["patch"]), "pool": DEFAULT_POOL,
                  "patches": patches, "minibatches": len(batches), "batch_size": DEFAULT_BATCH_SIZE,
                  "layer_pairs": len(sizes) ** 2, "features_per_patch": 2 * sum(sizes), "device": str(device),
                  "max_abs_difference": difference, "threads": torch.get_num_threads(), "timing": f"best of {REPEATS}"}
        memory = {method: peak_memory_mb(method, sizes, patches, device) for method in METHODS}
        rows.append({"name": f"cka_time_{patches}", "ours": ours_s, "baseline": baseline_s, "unit": "s",
                     "ratio": baseline_s / ours_s, "config": config})
        rows.append({"name": f"cka_memory_{patches}", "ours": memory["ours"], "baseline": memory["baseline"],
                     "unit": "MB", "ratio": memory["baseline"] / max(memory["ours"], 1e-3), "config": config})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="paper preset at 128^3 on a GPU (if there is one)")
    parser.add_argument("--peak-rss", nargs=3, metavar=("METHOD", "PATCHES", "SIZES"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.peak_rss:  # child process of peak_memory_mb
        method, patches, sizes = args.peak_rss
        print(_measure_rss_here(method, int(patches), json.loads(sizes)))
        return 0
    print(f"{'name':<18} {'ours':>10} {'baseline':>10} {'unit':>5} {'ratio':>7}")
    for row in run(args.full):
        print(f"{row['name']:<18} {row['ours']:>10.3f} {row['baseline']:>10.3f} {row['unit']:>5} {row['ratio']:>7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
