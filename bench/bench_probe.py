"""What judging an encoder costs: one ``nnssl_probe`` call vs one epoch of SwinUNETR fine-tuning (issue 18).

Data: a synthetic 10-case CT task made here and planned/preprocessed by ``nnUNetv2_plan_and_preprocess``.

- ours: wall seconds of :func:`nnssl.probe.run.run_probe` on an encoder file of the preset (seeded random
  weights; the cost does not depend on them) with the default settings: the encoder and the ``random``
  baseline are each probed (features of the fold-0 training patches, the classifier's steps, sliding-window
  inference on the validation cases), as one ``nnssl_probe`` call does.
- baseline: wall seconds of one nnU-Net fine-tuning epoch of the same preset's SwinUNETR: nnU-Net's default
  250 iterations (``nnUNetTrainer.num_iterations_per_epoch``), batch 2 of the probe's training patches at
  the plan's patch size, nnU-Net's loss (``DC_and_CE_loss``), AdamW, all 250 run. A fine-tuning at
  nnU-Net's default length is 1000 such epochs.

Row ``probe_seconds_<preset>``: ratio = baseline / ours (> 1: a probe costs less than one fine-tuning epoch).
Quick setting (``make bench``): tiny preset on the CPU; ``--full``: the paper preset on the GPU.

Run alone: ``python -m bench.bench_probe [--full]``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from nnssl.checkpoints import save_encoder
from nnssl.data.synthetic import write_task
from nnssl.networks import build_swinunetr, get_preset
from nnssl.networks.swin import build_encoder
from nnssl.paths import environment

DATASET_ID, CASES, EPOCH_ITERATIONS, BATCH = 602, 10, 250, 2
SETTINGS = {False: {"preset": "tiny", "device": "cpu"}, True: {"preset": "paper", "device": "cuda"}}


def _task(root: Path) -> None:
    write_task(root / "raw", DATASET_ID, "ProbeCT", num_training=CASES, num_test=1, seed=3)
    subprocess.run([str(Path(sys.executable).parent / "nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c",
                    "3d_fullres", "-np", "1"], check=True, capture_output=True)


def finetune_epoch_seconds(data, preset_name: str, device: torch.device) -> float:
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    torch.manual_seed(0)
    network = build_swinunetr(get_preset(preset_name), data.in_channels, data.num_classes).to(device)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
    loss_fn = DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                             weight_ce=1, weight_dice=1, dice_class=MemoryEfficientSoftDiceLoss)
    labels = torch.zeros(len(data.train_images), *data.patch_size, dtype=torch.long)  # the cost does not need them
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(EPOCH_ITERATIONS):
        index = torch.randint(len(data.train_images), (BATCH,), generator=generator)
        loss = loss_fn(network(data.train_images[index].to(device)), labels[index, None].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run(full: bool = False) -> list[dict]:
    from nnssl.probe.data import ProbeCases, load_probe_data
    from nnssl.probe.run import run_probe

    setting = SETTINGS[full]
    preset = get_preset(setting["preset"])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name in ("raw", "preprocessed"):
            (root / name).mkdir()
        with environment({"nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "preprocessed"),
                          "nnUNet_n_proc_DA": "1"}):
            _task(root)
            torch.manual_seed(0)
            encoder_file = root / "encoder_final.pth"
            save_encoder(encoder_file, build_encoder(preset), {"backbone": preset.to_dict(), "in_channels": 1,
                                                               "method": "bench", "run": "bench", "step": 0})
            cases = ProbeCases(dataset=DATASET_ID)
            start = time.perf_counter()
            record = run_probe(str(encoder_file), cases, root / "probe", device=setting["device"])
            ours = time.perf_counter() - start
            baseline = finetune_epoch_seconds(load_probe_data(cases), preset.name, torch.device(setting["device"]))
    config = {"preset": preset.name, "device": setting["device"], "cases": CASES,
              "train_cases": len(record["task"]["train_cases"]), "val_cases": len(record["task"]["val_cases"]),
              "patch": record["task"]["patch_size"], "probe_settings": record["settings"],
              "baseline": f"{EPOCH_ITERATIONS} SwinUNETR training iterations, batch {BATCH}",
              "threads": torch.get_num_threads()}
    return [{"name": f"probe_seconds_{preset.name}", "ours": ours, "baseline": baseline, "unit": "s",
             "ratio": baseline / ours, "config": config}]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="paper preset on the GPU")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.full), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
