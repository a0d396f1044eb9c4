"""nnssl_pretrain: self-supervised pretraining of a Swin encoder on an nnU-Net-preprocessed CT corpus."""
from __future__ import annotations

import argparse
import sys

from nnssl.cli import setup_logging
from nnssl.errors import exit_on_user_error


def _list_methods() -> str:
    from nnssl.methods.registry import METHODS, list_methods

    rows = [(name, METHODS[name].family, METHODS[name].description) for name in list_methods()]
    width = max(len(r[0]) for r in rows)
    family_width = max(len(r[1]) for r in rows)
    return "\n".join(f"{n:<{width}}  {f:<{family_width}}  {d}" for n, f, d in rows)


def _default(name: str) -> object:
    """A loop setting's built-in default (what applies when neither the plan nor a flag sets it)."""
    from nnssl.pretrain.config import PretrainConfig

    return PretrainConfig.__dataclass_fields__[name].default


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="nnssl_pretrain",
        description="Pretrain a Swin encoder with an SSL method on nnU-Net-preprocessed data. Defaults come from "
                    "plans/pretrain/<method>.json (paper scale); options here override them. Output: "
                    "$nnssl_results/<method>/<run>/ (config.json, log.csv, progress.png, checkpoints, "
                    "encoder_final.pth).")
    parser.add_argument("-m", "--method", dest="method", help="SSL method (see --list-methods)")
    parser.add_argument("-d", "--dataset", dest="datasets", nargs="+",
                        help="nnU-Net dataset id(s) or name(s); several are pooled")
    parser.add_argument("-c", "--configuration", dest="configuration",
                        help=f"nnU-Net configuration (default {_default('configuration')})")
    parser.add_argument("-p", dest="plans", help=f"nnU-Net plans identifier (default {_default('plans')})")
    parser.add_argument("--plan", dest="plan_file", metavar="FILE",
                        help="pretraining plan JSON to use instead of the installed plans/pretrain/<method>.json "
                             "(copy that file and edit it); its path is recorded in config.json")
    parser.add_argument("--backbone", help=f"Swin preset: paper, monai, tiny (plans/backbones.json; "
                                           f"default: the plan's, else {_default('backbone')})")
    parser.add_argument("--patch-size", type=int, nargs=3, metavar=("X", "Y", "Z"),
                        help="crop size in voxels, multiples of 32 (default: the backbone's input size)")
    parser.add_argument("--epochs", type=int, help=f"training epochs (default: the plan's, else {_default('epochs')})")
    parser.add_argument("--steps-per-epoch", type=int, help="default: one pass over the corpus")
    parser.add_argument("--batch-size", type=int, help=f"per GPU/process (default: the plan's, else "
                                                       f"{_default('batch_size')})")
    parser.add_argument("--lr", type=float, help=f"base peak learning rate, stated for a global batch of lr_batch (a "
                        f"plan setting); the loop scales it linearly to GPUs x batch size x accumulate (default: "
                        f"the plan's, else {_default('lr')})")
    parser.add_argument("--num-workers", type=int, help=f"data-loading worker processes per GPU/process "
                                                        f"(default {_default('num_workers')})")
    parser.add_argument("-device", "--device", dest="device", choices=("cuda", "cpu"),
                        help=f"where to train (default {_default('device')}; -device as in nnUNetv2_train)")
    parser.add_argument("--seed", type=int, help=f"seed of weights, views and masks (default {_default('seed')})")
    parser.add_argument("--grad-checkpointing", action="store_true", default=None,
                        help="activation checkpointing: recompute each Swin block in the backward pass instead of "
                             "storing its activations (less GPU memory, more compute, same gradients)")
    parser.add_argument("--run", "--run-name", dest="run",
                        help="run name (default: <backbone>_d<dataset ids>); under torchrun write --run-name, "
                             "since torchrun reads --run as its own --run-path")
    parser.add_argument("--probe", metavar="TASK",
                        help="nnU-Net task (id or name, planned and preprocessed) on which to linear-probe the encoder "
                             "fine-tuning will use (the teacher for DINO/iBOT) during the run, in this process: "
                             "probe_dice (mean foreground Dice on fold 0's validation cases) goes into log.csv and "
                             "progress.png; see nnssl_probe")
    parser.add_argument("--probe-every", type=int, metavar="K",
                        help="probe every K steps (and before the first and after the last). Default: as often as "
                             "keeps probing under 10%% of the run's time (before the first step, after the last, and "
                             "in between while the budget allows)")
    parser.add_argument("--resume", action="store_true", help="continue the run from its latest checkpoint")
    parser.add_argument("--logger", choices=("csv", "tensorboard"),
                        help="csv: log.csv only (default); tensorboard: TensorBoard event files in the run folder "
                             "as well (pip install 'nnssl[tensorboard]'; view with tensorboard --logdir "
                             "$nnssl_results)")
    parser.add_argument("--force-unlock", action="store_true",
                        help="take the run folder over from an owner that looks alive (run.owner.json): for when "
                             "you know that process is gone, e.g. its node crashed less than 5 minutes ago")
    parser.add_argument("--plans-override", nargs="+", default=[], metavar="KEY=VALUE",
                        help="any setting of plans/pretrain/<method>.json, e.g. grad_clip=1.0 method.mask_ratio=0.6")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved settings and where each comes from (default, plan file, command "
                             "line, --plans-override), then exit; needs no data and no GPU")
    parser.add_argument("--list-methods", action="store_true", help="list the registered SSL methods and exit")
    args = parser.parse_args(argv)
    setup_logging()
    with exit_on_user_error("nnssl_pretrain"):
        if args.list_methods:
            print(_list_methods())
            return 0
        if not args.method or not (args.datasets or args.print_config):
            parser.error("-m METHOD and -d DATASET are required (or --list-methods)")
        if args.logger == "tensorboard":
            from nnssl.pretrain.tracking import require_tensorboard

            require_tensorboard()  # before torch is imported: the answer comes at once
        from nnssl.pretrain.config import resolve_config_with_sources
        from nnssl.pretrain.loop import RunInterrupted, pretrain

        cli = {"configuration": args.configuration, "plans": args.plans, "backbone": args.backbone,
               "patch_size": args.patch_size, "epochs": args.epochs, "steps_per_epoch": args.steps_per_epoch,
               "batch_size": args.batch_size, "lr": args.lr, "num_workers": args.num_workers,
               "device": args.device, "seed": args.seed, "run": args.run, "logger": args.logger,
               "probe": args.probe, "probe_every": args.probe_every,
               "grad_checkpointing": args.grad_checkpointing}
        config, sources = resolve_config_with_sources(args.method, args.datasets or [], cli, args.plans_override,
                                                      args.plan_file)
        if args.print_config:
            from nnssl.pretrain.settings_table import settings_table

            print(settings_table(config, sources))
            return 0
        try:
            result = pretrain(config, resume=args.resume, force_unlock=args.force_unlock)
        except RunInterrupted as stop:
            print(f"nnssl_pretrain: {stop}", file=sys.stderr)
            return 128 + stop.signal_number
        print(f"encoder: {result.encoder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
