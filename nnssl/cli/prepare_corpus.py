"""nnssl_prepare_corpus: raw CT volumes -> an nnU-Net-preprocessed pretraining corpus."""
from __future__ import annotations

import argparse

from nnssl.data.corpus import prepare_corpus
from nnssl.cli import setup_logging
from nnssl.errors import exit_on_user_error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="nnssl_prepare_corpus",
        description="Turn a folder of raw CT volumes (NIfTI, MHA/MHD, NRRD, DICOM series) into an nnU-Net dataset "
                    "(body masks stand in for labels) and preprocess it with nnU-Net for nnssl_pretrain. "
                    "Bad volumes are reported and skipped. Re-running continues where it stopped.")
    parser.add_argument("-i", dest="raw_dir", required=True, help="folder with raw CT volumes (searched recursively)")
    parser.add_argument("-d", dest="dataset_id", type=int, required=True, help="nnU-Net dataset id, e.g. 501")
    parser.add_argument("-n", dest="name", required=True, help="dataset name, e.g. CTcorpus -> Dataset501_CTcorpus")
    parser.add_argument("-np", dest="num_processes", type=int, default=4, help="worker processes (default 4)")
    parser.add_argument("--spacing", nargs="+", default=["2", "2", "2"], metavar="MM",
                        help="target spacing x y z in mm (default 2 2 2, as the study), or 'nnunet' for "
                             "nnU-Net's own choice")
    parser.add_argument("--no-preprocess", dest="preprocess", action="store_false",
                        help="only convert; run nnUNetv2_plan_and_preprocess yourself later")
    args = parser.parse_args(argv)
    setup_logging()
    if args.spacing == ["nnunet"]:
        spacing = None
    elif len(args.spacing) == 3:
        try:
            spacing = tuple(float(s) for s in args.spacing)
        except ValueError:
            parser.error(f"--spacing takes three numbers in mm or 'nnunet', got {' '.join(args.spacing)}")
    else:
        parser.error(f"--spacing takes three numbers in mm or 'nnunet', got {' '.join(args.spacing)}")
    with exit_on_user_error("nnssl_prepare_corpus"):
        report = prepare_corpus(args.raw_dir, args.dataset_id, args.name, num_processes=args.num_processes,
                                target_spacing=spacing, preprocess=args.preprocess)
        print(report.summary())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
