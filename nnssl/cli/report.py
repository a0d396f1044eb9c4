"""nnssl_report: Dice, NSD, ranks, paired statistics, few-shot gap, convergence, CT vs MRI, method families,
feature reuse and pictures from $nnUNet_results."""
from __future__ import annotations

import argparse

from nnssl.cli import setup_logging
from nnssl.errors import exit_on_user_error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="nnssl_report",
        description="Walk $nnUNet_results, find every nnssl SwinUNETR trainer x fold (many-shot folds 0-4 and "
                    "few-shot folds from each dataset's fewshot.json) and write report.md, CSV tables and PNG "
                    "figures. Missing or unfinished runs are listed in the report.")
    parser.add_argument("datasets", nargs="*", metavar="DATASET",
                        help="nnU-Net dataset ids or names (default: every dataset in $nnUNet_results)")
    parser.add_argument("-d", dest="dataset_options", nargs="+", default=[], metavar="DATASET",
                        help="the same, nnU-Net's spelling")
    parser.add_argument("-o", dest="output", default="nnssl_report", help="output folder (default ./nnssl_report)")
    parser.add_argument("--plan", help="benchmark plan JSON with the baselines and NSD tolerances (default: "
                                       "plans/benchmark.json)")
    parser.add_argument("--baselines", nargs="*", metavar="TRAINER",
                        help="reference nnU-Net trainers shown as marked rows: trainer names (nnUNetTrainer) or "
                             "model folder names (nnUNetTrainer__nnUNetPlans__3d_fullres); default: the plan's "
                             "baselines; none given: no reference rows")
    parser.add_argument("--rank-baselines", action="store_true",
                        help="rank the baselines among the SSL methods (default: reference rows without a rank)")
    parser.add_argument("--cka", metavar="DIR", help="folder searched for nnssl_cka results (cka.json) of few- vs "
                                                     "many-shot models, for the feature-reuse section")
    parser.add_argument("--probe", metavar="DIR",
                        help="folder with nnssl_probe results (probe.json files, searched recursively): adds probe "
                             "Dice beside fine-tuning Dice and their rank correlation across methods")
    args = parser.parse_args(argv)
    setup_logging()
    with exit_on_user_error("nnssl_report"):
        from nnssl.analysis.report import make_report

        tables = make_report(datasets=[*args.datasets, *args.dataset_options] or None, output=args.output, plan=args.plan,
                             baselines=args.baselines, rank_baselines=args.rank_baselines, cka_dir=args.cka,
                             probe=args.probe)
    problems = len(tables["problems"])
    print(f"wrote {args.output}/report.md ({len(tables['dice'])} task x method x shot rows"
          f"{f', {problems} missing or unfinished runs listed' if problems else ''})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
