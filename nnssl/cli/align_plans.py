"""nnssl_align_plans: the pretraining corpus's plans moved onto fine-tuning tasks, then nnU-Net preprocessing."""
from __future__ import annotations

import argparse

from nnssl.align_plans import ALIGNED_PLANS, align_plans
from nnssl.cli import setup_logging
from nnssl.errors import exit_on_user_error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="nnssl_align_plans",
        description="Give fine-tuning tasks the plans of the pretraining corpus, as nnU-Net's "
                    "nnUNetv2_move_plans_between_datasets does, and preprocess their 3d_fullres configuration with "
                    "them: CT channels take the corpus's intensity statistics, every task takes the corpus's "
                    "spacing (or its override in the benchmark plan), MRI channels keep their own normalization, "
                    "and the patch size is planned again for SwinUNETR (multiples of 32) within nnU-Net's memory "
                    "target. Then: nnUNetv2_train TASK 3d_fullres FOLD -tr SwinUNETR_<Method>_Trainer -p nnsslPlans",
        epilog="Example: nnssl_align_plans -d 3 511 514 (the corpus's plans must exist: nnssl_prepare_corpus)")
    parser.add_argument("-d", dest="datasets", nargs="+", required=True, metavar="TASK",
                        help="dataset ids or names of the fine-tuning tasks (raw data in $nnUNet_raw)")
    parser.add_argument("--corpus", default=None,
                        help="dataset id or name of the preprocessed pretraining corpus (default: the study's, 501)")
    parser.add_argument("-pl", dest="plans_identifier", default=ALIGNED_PLANS,
                        help=f"identifier of the plans written (default {ALIGNED_PLANS}; train with -p IDENTIFIER)")
    parser.add_argument("--study", default=None, metavar="PLAN",
                        help="benchmark plan with the corpus id and per-task overrides (default plans/benchmark.json)")
    parser.add_argument("-np", dest="num_processes", type=int, default=4,
                        help="worker processes of nnU-Net's fingerprinting and preprocessing (default 4)")
    parser.add_argument("--no_pp", action="store_true", help="write the plans only; do not preprocess")
    parser.add_argument("--variant", metavar="NAME", default=None,
                        help="instead of aligning: write the plans variant IDENTIFIER_NAME of the (already written) "
                             "plans IDENTIFIER, which shares their preprocessed data and gives the trainer the --knob "
                             "values as defaults; one model folder per variant (e.g. per imported encoder)")
    parser.add_argument("--knob", dest="knobs", action="append", default=[], metavar="nnssl_KNOB=VALUE",
                        help="a trainer knob the variant sets, e.g. --knob nnssl_encoder_file=/enc/voco.pth "
                             "(repeatable; an environment variable of the same name still wins)")
    args = parser.parse_args(argv)
    setup_logging()
    if args.knobs and args.variant is None:
        parser.error("--knob needs --variant NAME: knobs are recorded in a plans variant")
    with exit_on_user_error("nnssl_align_plans"):
        if args.variant is not None:
            _write_variants(args.datasets, args.plans_identifier, args.variant, args.knobs, parser)
            return 0
        from nnssl.benchmark.study import load_study

        study = load_study(args.study)
        overrides = {task.dataset_id: task.align for task in study.tasks.values() if task.align}
        align_plans(args.datasets, args.corpus or study.corpus_id, args.plans_identifier, overrides,
                    num_processes=args.num_processes, preprocess=not args.no_pp)
    return 0


def _write_variants(datasets: list[str], plans_identifier: str, name: str, knobs: list[str],
                    parser: argparse.ArgumentParser) -> None:
    from nnssl.paths import preprocessed_dataset
    from nnssl.plans_variants import write_plans_variant

    pairs = [knob.partition("=") for knob in knobs]
    bad = [knob for knob, (_, sep, _) in zip(knobs, pairs) if not sep]
    if bad:
        parser.error(f"--knob {bad[0]}: expected nnssl_KNOB=VALUE, e.g. --knob nnssl_encoder_file=/enc/voco.pth")
    for dataset in datasets:
        path = write_plans_variant(preprocessed_dataset(dataset), plans_identifier, name,
                                   {key: value for key, _, value in pairs})
        print(f"{path}: train with -p {path.stem}")


if __name__ == "__main__":
    raise SystemExit(main())
