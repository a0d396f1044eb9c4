"""Swin step benchmark (issue 9): one training step of SwinUNETR and of its Swin encoder, ours vs stock MONAI.

A step is forward, loss, backward and AdamW step on one fixed batch ``(B, 1, S, S, S)``:

- ours: ``build_swinunetr(preset, 1, 2)`` / ``build_encoder(preset)`` (the fast path of
  ``nnssl/networks/fast_swin.py``) with fused AdamW (``fast_swin.adamw``); on CUDA also bf16 autocast and
  fused attention (``scaled_dot_product_attention`` with the relative position bias); environment
  variables ``NNSSL_BENCH_COMPILE=1`` add ``torch.compile`` (inductor on CUDA, ``aot_eager`` on a CPU) and
  ``NNSSL_BENCH_CHECKPOINT=1`` activation checkpointing (both recorded in the row's config).
- baseline: ``monai.networks.nets.SwinUNETR`` with the preset's shape and MONAI's defaults otherwise
  (fp32, plain attention, no checkpointing) and ``torch.optim.AdamW`` with its defaults; the encoder
  baseline is that network's ``swinViT``.

Both start from the same weights (the baseline loads ours), see the same input and labels (seeded), and
their first losses must agree (fp32: 1e-4 relative; bf16: 2e-2), else the benchmark fails. The loss is
cross-entropy against fixed random labels (SwinUNETR) or the mean square of the 5 feature maps (encoder).

Rows (``<size>`` = S): ``swin_step_<preset>_<size>`` and ``swin_encoder_step_<preset>_<size>``: median
seconds per step over interleaved repeats (ours, baseline, baseline, ours, ...: a busy machine slows both
alike) after one warm-up step each; ``swin_memory_<preset>_<size>``, ``swin_encoder_memory_<preset>_<size>``:
peak memory of two steps, each variant in a fresh process: on CPU the growth of the peak resident set
(``VmHWM``, reset after building network, optimizer and batch), i.e. activations, gradients, optimizer
state and temporaries; on CUDA ``torch.cuda.max_memory_allocated`` (everything, weights included).
``swin_memory_checkpointing_<preset>_<size>``: the same peak memory of our SwinUNETR with activation
checkpointing (``use_checkpoint``, as ``nnssl_checkpointing=1`` builds it; ours) and without (baseline); on the
CPU the median of 3 such pairs of fresh processes.
The quick setting (CPU, ``make bench``) runs the tiny preset at 64/96/128 (growth with patch size) and
the paper preset at 64 (the issue's target), checkpointing at tiny 96; ``--full`` every preset at every size
and checkpointing at paper 128 (``bench/bench_gpu.py`` runs the GPU selection).

Run alone: ``python -m bench.bench_swin [--full] [--case PRESET SIZE]``; ``--checkpointing`` measures only the
checkpointing rows, and ``--results bench/results.json`` merges the rows into the results as ``bench.run`` does.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

SEED = 0
REPO = Path(__file__).resolve().parent.parent
NETWORKS = {"swinunetr": "swin", "encoder": "swin_encoder"}  # network -> row name prefix
SETTINGS = {
    False: {"batch": 1, "repeats": 5, "memory_steps": 2,
            "cases": [("tiny", 64), ("tiny", 96), ("tiny", 128), ("paper", 64)],
            "checkpointing_cases": [("tiny", 96)], "checkpointing_repeats": 3},
    True: {"batch": 2, "repeats": 10, "memory_steps": 2,
           "cases": [(p, s) for p in ("tiny", "monai", "paper") for s in (64, 96, 128)],
           "checkpointing_cases": [("paper", 128)], "checkpointing_repeats": 1},
}
LOSS_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


@dataclass(frozen=True)
class Case:
    """One measured configuration."""

    preset: str
    size: int
    batch: int
    network: str  # "swinunetr" | "encoder"
    device: str
    compile: bool = False
    checkpoint: bool = False
    precision: str = "auto"  # ours: "auto" = bf16 autocast on CUDA, fp32 elsewhere; or "fp32", "bf16" anywhere


class Stepper:
    """A network, its optimizer and a fixed batch, ready to take timed training steps."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, case: Case, ours: bool):
        self.model, self.optimizer, self.case = model, optimizer, case
        self.device = torch.device(case.device)
        generator = torch.Generator().manual_seed(SEED)
        shape = (case.batch, 1, case.size, case.size, case.size)
        self.x = torch.randn(shape, generator=generator).to(self.device)
        self.labels = torch.randint(0, 2, (case.batch, *shape[2:]), generator=generator).to(self.device)
        self.ours = ours
        bf16 = case.precision == "bf16" or (case.precision == "auto" and self.device.type == "cuda")
        self.dtype = torch.bfloat16 if ours and bf16 else torch.float32
        # inductor generates GPU kernels; on a CPU, aot_eager traces the same graphs (forward and backward) and
        # runs them eagerly, without the C++ toolchain and minutes of compilation inductor needs there
        backend = "inductor" if self.device.type == "cuda" else "aot_eager"
        self.forward = torch.compile(model, backend=backend) if ours and case.compile else model

    def step(self) -> float:
        """One training step; returns its loss."""
        self.optimizer.zero_grad(set_to_none=True)
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.dtype == torch.bfloat16)
        with autocast:
            out = self.forward(self.x)
            if self.case.network == "encoder":
                loss = sum(o.float().square().mean() for o in out)
            else:
                loss = F.cross_entropy(out.float(), self.labels)
        loss.backward()
        self.optimizer.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return loss.detach().item()


def build(case: Case) -> dict[str, Stepper]:
    """Ours and the baseline for ``case``, with the same weights."""
    from monai.networks.nets import SwinUNETR

    from nnssl.networks import build_encoder, build_swinunetr, get_preset
    from nnssl.networks.fast_swin import adamw

    preset = get_preset(case.preset)
    torch.manual_seed(SEED)
    if case.network == "encoder":
        ours = build_encoder(preset, use_checkpoint=case.checkpoint)
    else:
        ours = build_swinunetr(preset, in_channels=1, out_channels=2, use_checkpoint=case.checkpoint)
    stock = SwinUNETR(in_channels=1, out_channels=2, feature_size=preset.feature_size, depths=preset.depths,
                      num_heads=preset.num_heads, window_size=preset.window_size, qkv_bias=preset.qkv_bias,
                      mlp_ratio=preset.mlp_ratio, patch_size=preset.patch_size)
    baseline = stock.swinViT if case.network == "encoder" else stock
    baseline.load_state_dict(ours.state_dict())
    ours, baseline = ours.to(case.device), baseline.to(case.device)
    return {"ours": Stepper(ours, adamw(ours.parameters(), lr=1e-4), case, ours=True),
            "baseline": Stepper(baseline, torch.optim.AdamW(baseline.parameters(), lr=1e-4), case, ours=False)}


def time_steps(case: Case, repeats: int) -> dict:
    """Median seconds per step of ours and the baseline, interleaved; checks their first losses agree."""
    steppers = build(case)
    first = {name: stepper.step() for name, stepper in steppers.items()}  # warm-up
    difference = abs(first["ours"] - first["baseline"]) / abs(first["baseline"])
    if difference > LOSS_TOLERANCE[steppers["ours"].dtype]:
        raise RuntimeError(f"{case}: ours and the baseline disagree on the first loss ({first}); the fast path "
                           f"no longer computes the stock network")
    seconds = {name: [] for name in steppers}
    for repeat in range(repeats):
        order = ("ours", "baseline") if repeat % 2 == 0 else ("baseline", "ours")
        for name in order:
            start = time.perf_counter()
            steppers[name].step()
            seconds[name].append(time.perf_counter() - start)
    return {"seconds": seconds, "loss_difference": difference}


def peak_memory_mb(case: Case, variant: str, steps: int) -> float:
    """Peak memory of ``steps`` training steps of one variant, measured in a fresh process."""
    command = [sys.executable, "-m", "bench.bench_swin", "--memory-child", variant, json.dumps(asdict(case)),
               str(steps)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        raise RuntimeError(f"memory probe {variant} {case} failed:\n{result.stderr[-3000:]}")
    return float(result.stdout.strip().splitlines()[-1])


def _status_mb(field: str) -> float:
    """A field of /proc/self/status (VmRSS: resident now, VmHWM: peak resident) in MB."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":")) / 1024


def _measure_here(variant: str, case: Case, steps: int) -> float:
    stepper = build(case)[variant]
    if case.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(steps):
            stepper.step()
        return torch.cuda.max_memory_allocated() / 2**20
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # Linux: reset the peak resident size (VmHWM) to the current one
    before = _status_mb("VmRSS")
    for _ in range(steps):
        stepper.step()
    return _status_mb("VmHWM") - before


def checkpointing_row(preset: str, size: int, batch: int, device: str, steps: int, repeats: int = 1) -> dict:
    """``swin_memory_checkpointing_<preset>_<size>``: peak memory of ``steps`` training steps of our SwinUNETR with
    activation checkpointing (ours) and without (baseline), each in a fresh process; the median of ``repeats``
    such pairs, measured in turn (the resident-set peak of a CPU process varies by a few percent from run to run
    with the allocator's reuse of freed memory)."""
    memory = {True: [], False: []}
    for _ in range(repeats):
        for flag in memory:
            case = Case(preset, size, batch, "swinunetr", device, checkpoint=flag)
            memory[flag].append(peak_memory_mb(case, "ours", steps))
    ours, baseline = statistics.median(memory[True]), statistics.median(memory[False])
    config = {"preset": preset, "size": size, "batch": batch, "device": device, "steps": steps,
              "memory": "peak of max_memory_allocated" if device == "cuda" else
                        "growth of peak RSS (VmHWM), fresh process",
              "repeats": repeats, "runs_mb": {"checkpointing": [round(m, 1) for m in memory[True]],
                                              "none": [round(m, 1) for m in memory[False]]},
              "saving": round(1 - ours / baseline, 3)}
    return {"name": f"swin_memory_checkpointing_{preset}_{size}", "ours": ours, "baseline": baseline,
            "unit": "MB", "ratio": baseline / ours, "config": config}


def _options() -> dict[str, bool]:
    return {"compile": os.environ.get("NNSSL_BENCH_COMPILE") == "1",
            "checkpoint": os.environ.get("NNSSL_BENCH_CHECKPOINT") == "1"}


def _device(full: bool) -> str:
    return "cuda" if full and torch.cuda.is_available() else "cpu"


def checkpointing_rows(full: bool) -> list[dict]:
    """The ``swin_memory_checkpointing_*`` rows of the setting."""
    setting = SETTINGS[full]
    return [checkpointing_row(preset, size, setting["batch"], _device(full), setting["memory_steps"],
                              setting["checkpointing_repeats"]) for preset, size in setting["checkpointing_cases"]]


def run(full: bool, cases: list[tuple[str, int]] | None = None) -> list[dict]:
    setting = SETTINGS[full]
    device = _device(full)
    rows = []
    for preset, size in cases or setting["cases"]:
        for network, prefix in NETWORKS.items():
            case = Case(preset, size, setting["batch"], network, device, **_options())
            timing = time_steps(case, setting["repeats"])
            ours, baseline = (statistics.median(timing["seconds"][name]) for name in ("ours", "baseline"))
            memory = {name: peak_memory_mb(case, name, setting["memory_steps"]) for name in ("ours", "baseline")}
            config = {**asdict(case), "threads": torch.get_num_threads(), "repeats": setting["repeats"],
                      "seconds": {k: [round(s, 4) for s in v] for k, v in timing["seconds"].items()},
                      "first_loss_relative_difference": timing["loss_difference"],
                      "memory": "peak of max_memory_allocated over 2 steps" if device == "cuda" else
                                "growth of peak RSS (VmHWM) over 2 steps, fresh process"}
            rows.append({"name": f"{prefix}_step_{preset}_{size}", "ours": ours, "baseline": baseline,
                         "unit": "s/step", "ratio": baseline / ours, "config": config})
            rows.append({"name": f"{prefix}_memory_{preset}_{size}", "ours": memory["ours"],
                         "baseline": memory["baseline"], "unit": "MB", "ratio": memory["baseline"] / memory["ours"],
                         "config": config})
    if cases is None:
        rows += checkpointing_rows(full)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="every preset at 64/96/128, batch 2, on a GPU if any")
    parser.add_argument("--case", nargs=2, action="append", metavar=("PRESET", "SIZE"),
                        help="measure only this preset and patch size (repeatable)")
    parser.add_argument("--checkpointing", action="store_true",
                        help="measure only the swin_memory_checkpointing rows (activation checkpointing vs none)")
    parser.add_argument("--results", type=Path, help="merge the rows into this results file and rewrite the "
                                                      "RESULTS.md beside it (default: print only)")
    parser.add_argument("--memory-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:  # a fresh process of peak_memory_mb
        variant, case, steps = args.memory_child
        print(_measure_here(variant, Case(**json.loads(case)), int(steps)))
        return 0
    from bench.run import check_rows, format_table, record, stamp

    cases = [(preset, int(size)) for preset, size in args.case] if args.case else None
    rows = checkpointing_rows(args.full) if args.checkpointing else run(args.full, cases)
    print(format_table(rows))
    if args.results:
        record(stamp(check_rows("bench.bench_swin", rows)), args.results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
