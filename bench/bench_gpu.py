"""The GPU benchmark (``make bench ARGS=--full``): the figures a GPU user needs, in one run of under 10 minutes.

Rows (all ``gpu_*``; ours vs a baseline measured in the same run, ``ratio`` > 1: ours is better):

- ``gpu_swin_step_<preset>_<size>_<variant>`` (s/step) and ``gpu_swin_memory_<preset>_<size>_<variant>`` (MB): one
  SwinUNETR training step (forward, cross-entropy, backward, AdamW) of ours, batch ``(B, 1, S, S, S)``, against
  stock MONAI ``SwinUNETR`` in fp32 with the same weights (``bench/bench_swin.py``'s steppers). Variants:
  ``fp32``; ``bf16`` (autocast); ``compiled`` (bf16 and ``torch.compile``, inductor). Time: median of
  interleaved repeats after a warm-up step (for ``compiled``, the compilation). Memory: the peak of
  ``torch.cuda.max_memory_allocated`` over two steps, each variant in a fresh process
  (``bench_swin.peak_memory_mb``; on a CPU the growth of the peak resident set).
- ``gpu_pretrain_step_<method>`` (s/step): one pretraining step of each SSL method (bf16 autocast, AdamW, EMA)
  against SimMIM's in the same process (``bench/bench_pretrain.py``'s ``measure``); ``config.peak_mib`` holds
  the method's peak memory.
- ``gpu_inference_sliding_window_<preset>_<size>`` (s/case): nnU-Net's ``nnUNetPredictor`` sliding-window
  prediction of one case (``case`` voxels, patch S^3, step 0.5, Gaussian weighting, mirroring on all three
  axes as ``nnUNetv2_predict`` does by default, fp16 autocast as nnU-Net on CUDA), ours vs stock MONAI.
- ``gpu_swin_memory_checkpointing_<preset>_<size>`` (MB): peak memory of two training steps with activation
  checkpointing (ours) and without (baseline), each in a fresh process (``bench_swin.checkpointing_row``).

``python -m bench.bench_gpu --device cpu`` is a dry run of the same code with tiny sizes (tiny preset, 64^3,
one repeat, a 64 x 64 x 96 case, SimMIM and DINO only, ``aot_eager`` instead of inductor, which needs a C++
toolchain and minutes on a CPU): it checks that the script works, its figures mean nothing, and it writes
rows only with ``--results``. ``bench.run --full`` refuses to run without CUDA.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from bench.bench_swin import Case, build, checkpointing_row, peak_memory_mb, time_steps
from nnssl.errors import NnsslError


@dataclass(frozen=True)
class Sizes:
    """What one run measures."""

    preset: str
    size: int
    batch: int
    repeats: int
    case: tuple[int, int, int]  # voxels of the case predicted by sliding window
    methods: list[str] | None = None  # None: every registered method
    pretrain_steps: int = 5
    mirroring: bool = True
    memory_steps: int = 2
    variants: dict[str, dict] = field(default_factory=lambda: {
        "fp32": {"precision": "fp32"}, "bf16": {"precision": "bf16"},
        "compiled": {"precision": "bf16", "compile": True}})


SIZES = {"cuda": Sizes("paper", 128, batch=2, repeats=10, case=(192, 256, 256)),
         "cpu": Sizes("tiny", 64, batch=1, repeats=1, case=(64, 64, 96), methods=["simmim", "dino"], pretrain_steps=1,
                      mirroring=False)}


def row_names(sizes: Sizes) -> list[str]:
    """The names of the rows :func:`run_suite` writes for ``sizes``, in its order."""
    from nnssl.methods.registry import list_methods

    shape = f"{sizes.preset}_{sizes.size}"
    return ([f"gpu_swin_{what}_{shape}_{variant}" for variant in sizes.variants for what in ("step", "memory")]
            + [f"gpu_pretrain_step_{method}" for method in sizes.methods or list_methods()]
            + [f"gpu_inference_sliding_window_{shape}", f"gpu_swin_memory_checkpointing_{shape}"])


def results_section(stored: list[dict]) -> list[str]:
    """The GPU part of RESULTS.md: how to fill it and which of its rows are not measured yet."""
    names = {row["name"] for row in stored}
    missing = [name for name in row_names(SIZES["cuda"]) if name not in names]
    lines = ["## GPU benchmark (`make bench ARGS=--full`)", "",
             "One script, `bench/bench_gpu.py`, meant to finish in under 10 minutes on one GPU with at least 48 GB "
             "(the stock fp32 baseline at the `paper` preset, 128^3, batch 2): `make bench ARGS=--full` on a CUDA "
             "machine merges its `gpu_*` rows into `bench/results.json` and rewrites this file. It refuses to run "
             "without CUDA; `python -m bench.bench_gpu --device cpu` is a dry run of the same code with tiny "
             "sizes. What each row measures: the docstring of `bench/bench_gpu.py`.", ""]
    if missing:
        lines += [f"Not measured yet ({len(missing)} rows): " + ", ".join(f"`{name}`" for name in missing) + ".", ""]
    return lines


def require_cuda(device: str) -> None:
    """The full benchmark's figures are GPU figures: refuse, with what to run instead, where CUDA is missing."""
    if device == "cuda" and not torch.cuda.is_available():
        raise NnsslError("make bench ARGS=--full measures the GPU figures (bench/bench_gpu.py), but this machine has "
                         "no CUDA device (torch.cuda.is_available() is False). Run it on a GPU machine; here, "
                         "`make bench` measures the CPU figures and `python -m bench.bench_gpu --device cpu` is a dry "
                         "run of the GPU script with tiny sizes.")


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def swin_rows(sizes: Sizes, device: str) -> list[dict]:
    rows = []
    for variant, options in sizes.variants.items():
        case = Case(sizes.preset, sizes.size, sizes.batch, "swinunetr", device, **options)
        timing = time_steps(case, sizes.repeats)  # after a warm-up step each: kernels chosen, graphs compiled
        ours, baseline = (statistics.median(timing["seconds"][name]) for name in ("ours", "baseline"))
        _free(device)
        memory = {name: peak_memory_mb(case, name, sizes.memory_steps) for name in ("ours", "baseline")}
        config = {**asdict(case), "repeats": sizes.repeats,
                  "first_loss_relative_difference": timing["loss_difference"],
                  "compile_backend": ("inductor" if device == "cuda" else "aot_eager") if case.compile else None}
        name = f"{sizes.preset}_{sizes.size}_{variant}"
        rows.append({"name": f"gpu_swin_step_{name}", "ours": ours, "baseline": baseline, "unit": "s/step",
                     "ratio": baseline / ours, "config": config})
        rows.append({"name": f"gpu_swin_memory_{name}", "ours": memory["ours"], "baseline": memory["baseline"],
                     "unit": "MB", "ratio": memory["baseline"] / memory["ours"], "config": config})
    return rows


def pretrain_rows(sizes: Sizes, device: str) -> list[dict]:
    from bench.bench_pretrain import measure
    from nnssl.methods.registry import list_methods

    rows = []
    for method in sizes.methods or list_methods():
        result = measure(method, sizes.preset, sizes.size, sizes.batch, sizes.pretrain_steps, device)
        rows.append({"name": f"gpu_pretrain_step_{method}", "ours": result["seconds"],
                     "baseline": result["simmim_seconds"], "unit": "s/step (baseline: simmim, same process)",
                     "ratio": result["simmim_seconds"] / result["seconds"],
                     "config": {"preset": sizes.preset, "patch": sizes.size, "batch": sizes.batch,
                                "steps": sizes.pretrain_steps, "device": device, "peak_mib": result["peak_mib"]}})
        _free(device)
    return rows


def sliding_window_predictor(network: torch.nn.Module, patch_size: tuple[int, int, int], device: str,
                             mirroring: bool):
    """nnU-Net's ``nnUNetPredictor`` around ``network`` (2 classes): step 0.5, Gaussian weighting, as
    ``nnUNetv2_predict`` sets it up, with mirroring on all three axes if ``mirroring``."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring,
                                perform_everything_on_device=True, device=torch.device(device), allow_tqdm=False)
    plans = PlansManager({"dataset_name": "Dataset999_Bench", "plans_name": "nnUNetPlans",
                          "configurations": {"3d_fullres": {"patch_size": list(patch_size), "architecture": {}}}})
    predictor.manual_initialization(network, plans, plans.get_configuration("3d_fullres"), None,
                                    {"labels": {"background": 0, "foreground": 1}}, "SwinUNETR_Scratch_Trainer",
                                    (0, 1, 2))
    return predictor


def inference_row(sizes: Sizes, device: str) -> dict:
    case = Case(sizes.preset, sizes.size, 1, "swinunetr", device)
    networks = {name: stepper.model.eval() for name, stepper in build(case).items()}
    image = torch.randn(1, *sizes.case, generator=torch.Generator().manual_seed(0))
    seconds = {}
    for name, network in networks.items():
        predictor = sliding_window_predictor(network, (sizes.size,) * 3, device, sizes.mirroring)
        with torch.inference_mode():
            predictor.network(torch.randn(1, 1, *(sizes.size,) * 3, device=device))  # warm-up: kernels, caches
        _synchronize(device)
        start = time.perf_counter()
        predictor.predict_sliding_window_return_logits(image)
        _synchronize(device)
        seconds[name] = time.perf_counter() - start
    return {"name": f"gpu_inference_sliding_window_{sizes.preset}_{sizes.size}", "ours": seconds["ours"],
            "baseline": seconds["baseline"], "unit": "s/case", "ratio": seconds["baseline"] / seconds["ours"],
            "config": {"preset": sizes.preset, "patch": sizes.size, "case": list(sizes.case), "device": device,
                       "tile_step_size": 0.5, "mirroring": sizes.mirroring}}


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def run_suite(device: str, sizes: Sizes | None = None) -> list[dict]:
    """Every row of the GPU benchmark on ``device`` ("cuda"; "cpu" for the dry run), in the order above."""
    require_cuda(device)
    sizes = sizes or SIZES[device]
    rows = swin_rows(sizes, device) + pretrain_rows(sizes, device) + [inference_row(sizes, device)]
    row = checkpointing_row(sizes.preset, sizes.size, sizes.batch, device, sizes.memory_steps)
    return rows + [{**row, "name": "gpu_" + row["name"]}]


def run(full: bool) -> list[dict]:
    """``bench.run`` entry: the suite on CUDA with ``--full``; in the quick CPU setting, the dry run's code
    path would measure nothing worth storing, so there is nothing to run."""
    return run_suite("cuda") if full else []


def main(argv: list[str] | None = None) -> int:
    from bench.run import check_rows, format_table, record, stamp
    from nnssl.errors import exit_on_user_error

    parser = argparse.ArgumentParser(prog="bench.bench_gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: a dry run with tiny sizes (checks the script, not the figures)")
    parser.add_argument("--results", type=Path, help="merge the rows into this results file and rewrite the "
                                                      "RESULTS.md beside it (default: print only)")
    args = parser.parse_args(argv)
    with exit_on_user_error("bench.bench_gpu"):
        rows = stamp(check_rows("bench.bench_gpu", run_suite(args.device)))
    print(format_table(rows))
    if args.results:
        record(rows, args.results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
