"""nnssl_benchmark: plan and run the whole study (pretraining, nnU-Net planning, few-shot folds, fine-tuning,
CKA, report) from plans/benchmark.json, resumably, one job per GPU."""
from __future__ import annotations

import argparse

from nnssl.cli import setup_logging
from nnssl.cli.cluster_options import add_cluster_arguments, cluster_from_args
from nnssl.errors import exit_on_user_error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="nnssl_benchmark",
        description="Run the benchmark of plans/benchmark.json: corpus pretraining per method, "
                    "nnUNetv2_plan_and_preprocess per task, nnssl_fewshot folds, every nnUNetv2_train fine-tuning "
                    "run (validation included), nnssl_cka (few- vs many-shot) and nnssl_report. Finished runs "
                    "are skipped and interrupted ones continued (--c / --resume), so the same command resumes the "
                    "study. Logs: <output>/logs/<job>.log; outcome: <output>/summary.json.",
        epilog="Examples: nnssl_benchmark --dry-run | nnssl_benchmark --tasks BTCV CHAOS --methods smit scratch "
               "--shots 5 all --folds 0 --gpus 4 | nnssl_benchmark --executor slurm --partition gpu --time 1-00:00:00 "
               "| nnssl_benchmark --status")
    parser.add_argument("--tasks", "-d", nargs="+", metavar="TASK", help="task names or dataset ids (default: all nine)")
    parser.add_argument("--methods", nargs="+", metavar="M", help="SSL methods and/or scratch (default: all)")
    parser.add_argument("--shots", nargs="+", metavar="N", help="few-shot sizes and/or 'all' for the many-shot "
                                                               "folds (default: every size of the plan, and all)")
    parser.add_argument("--folds", "-f", nargs="+", type=int, metavar="F", help="many-shot folds, and the few-shot "
                                                                          "folds drawn from them (default: 0-4)")
    parser.add_argument("--gpus", type=int, help="GPUs to use, one job each (default: all visible)")
    parser.add_argument("-device", "--device", dest="device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: run every job on the CPU (toy studies)")
    parser.add_argument("--jobs", type=int, help="with --device cpu: training jobs at a time, each with its share "
                                                 "of the cores as OMP_NUM_THREADS (default 1)")
    parser.add_argument("--corpus-dir", help="raw CT folder to make the pretraining corpus from if it is missing")
    parser.add_argument("-o", dest="output", help="folder for logs, CKA and report (default: "
                                                  "$nnssl_results/benchmark)")
    parser.add_argument("--plan", help="benchmark plan JSON (default: plans/benchmark.json)")
    parser.add_argument("--dry-run", action="store_true", help="print every job's exact command and state; run "
                                                               "nothing (with --executor slurm: every sbatch call)")
    actions = parser.add_mutually_exclusive_group()
    actions.add_argument("--status", action="store_true", help="show which jobs of the study are queued, running, "
                                                               "done, failed, skipped or not submitted")
    actions.add_argument("--cancel", action="store_true", help="scancel the study's queued and running Slurm jobs")
    actions.add_argument("--estimate", action="store_true", help="print per job kind the count and GPU-hours of "
                                                                 "what is left to run, measured or from the plan")
    add_cluster_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging()
    with exit_on_user_error("nnssl_benchmark"):
        from nnssl.benchmark.driver import run_benchmark

        action = "status" if args.status else "cancel" if args.cancel else "estimate" if args.estimate else "run"
        outcome = run_benchmark(tasks=args.tasks, methods=args.methods, shots=args.shots, folds=args.folds,
                                gpus=args.gpus, dry_run=args.dry_run, plan=args.plan, output=args.output,
                                device=args.device, corpus_dir=args.corpus_dir, jobs=args.jobs,
                                executor=args.executor, cluster=cluster_from_args(args, args.plan), action=action,
                                wait=args.wait)
        print(outcome.text)
    return 0 if outcome.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
