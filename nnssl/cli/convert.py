"""nnssl_convert: a public dataset's official download -> an nnU-Net raw dataset of the benchmark."""
from __future__ import annotations

import argparse

from nnssl.cli import setup_logging
from nnssl.errors import exit_on_user_error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="nnssl_convert",
        description="Convert the official download of one benchmark task (plans/benchmark.json) into nnU-Net's "
                    "raw format: DatasetXXX_Name/{imagesTr,labelsTr,imagesTs,dataset.json}. Re-running continues "
                    "an interrupted conversion; a finished dataset is left as it is.",
        epilog="Tasks and dataset ids: Liver 003, Lung 006, Pancreas 007, BTCV 511, AMOS-CT 512, HaN-Seg 513, "
               "AMOS-MRI 514, CHAOS 515, BrainTumour 001. Example: nnssl_convert BTCV ~/Downloads/RawData")
    parser.add_argument("task", help="task name or dataset id, e.g. BTCV, AMOS-MRI, 3, Dataset003_Liver")
    parser.add_argument("source_dir", help="the extracted download (or the folder it was extracted into)")
    parser.add_argument("-o", dest="output", help="nnU-Net raw folder to write to (default: $nnUNet_raw)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DatasetXXX_Name folder")
    parser.add_argument("--plan", help="benchmark plan JSON (default: plans/benchmark.json)")
    args = parser.parse_args(argv)
    setup_logging()
    with exit_on_user_error("nnssl_convert"):
        from nnssl.benchmark.converters import convert

        folder = convert(task=args.task, source_dir=args.source_dir, out_root=args.output,
                         overwrite=args.overwrite, plan=args.plan)
        print(folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
