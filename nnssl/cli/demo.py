"""nnssl_demo (make demo): the whole study in miniature on the CPU, on synthetic data, through nnssl_benchmark."""
from __future__ import annotations

import argparse

from nnssl.benchmark.demo import DEFAULT_OUTPUT, DEMO_PLAN
from nnssl.cli import setup_logging
from nnssl.cli.cluster_options import add_cluster_arguments, cluster_from_args
from nnssl.errors import exit_on_user_error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="nnssl_demo",
        description=f"Run the study of plans/{DEMO_PLAN} in miniature on the CPU: synthetic CT corpus, one CT and "
                    f"one MRI task, nnU-Net planning, short pretraining of SMIT, few- and many-shot "
                    f"fine-tuning of SwinUNETR from scratch and from the encoder and of the nnU-Net baseline with "
                    f"nnUNetv2_train, nnssl_cka and nnssl_report, all through nnssl_benchmark. About "
                    f"15 minutes on 2 CPU cores; toy-scale numbers. Everything goes to OUT (nnUNet_raw, "
                    f"nnUNet_preprocessed, nnUNet_results and nnssl_results point there, whatever your shell sets); "
                    f"running it again skips finished work.",
        epilog="Examples: nnssl_demo | nnssl_demo --quick -o /tmp/demo | nnssl_demo --dry-run | "
               "nnssl_demo --quick --executor slurm --partition cpu (each job of the study submitted to Slurm; "
               "the demo waits for them)")
    parser.add_argument("-o", dest="output", default=DEFAULT_OUTPUT,
                        help=f"output folder (default ./{DEFAULT_OUTPUT})")
    parser.add_argument("--quick", action="store_true",
                        help="fewer pretraining steps and fine-tuning iterations (a smoke test; use its own -o)")
    parser.add_argument("--jobs", type=int, help="training jobs at a time, sharing the cores (default: 2, or 1 "
                                                 "on a one-core machine)")
    parser.add_argument("--dry-run", action="store_true",
                        help="write OUT/plan.json and print every command the demo would run; run nothing")
    add_cluster_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging()
    with exit_on_user_error("nnssl_demo"):
        from nnssl.benchmark.demo import run_demo

        cluster = cluster_from_args(args) if args.executor == "slurm" else None
        outcome = run_demo(output=args.output, quick=args.quick, dry_run=args.dry_run, jobs=args.jobs,
                           cluster=cluster)
    print(outcome.text)
    return 0 if outcome.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
