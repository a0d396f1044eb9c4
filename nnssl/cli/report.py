"""nnssl_report: Dice, ranks, few-shot gap, convergence, CT vs MRI and method families from $nnUNet_results."""
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
    parser.add_argument("-o", dest="output", default="nnssl_report", help="output folder (default ./nnssl_report)")
    parser.add_argument("--probe", metavar="DIR",
                        help="folder with nnssl_probe results (probe.json files, searched recursively): adds probe "
                             "Dice beside fine-tuning Dice and their rank correlation across methods")
    args = parser.parse_args(argv)
    setup_logging()
    with exit_on_user_error("nnssl_report"):
        from nnssl.analysis.report import make_report

        tables = make_report(datasets=args.datasets or None, output=args.output, probe=args.probe)
    problems = len(tables["problems"])
    print(f"wrote {args.output}/report.md ({len(tables['dice'])} task x method x shot rows"
          f"{f', {problems} missing or unfinished runs listed' if problems else ''})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
