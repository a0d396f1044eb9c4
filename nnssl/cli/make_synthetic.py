"""nnssl_make_synthetic: small synthetic abdominal CT/MRI data for trying nnssl without a download."""
from __future__ import annotations

import argparse
from pathlib import Path

from nnssl.errors import NnsslError, exit_on_user_error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="nnssl_make_synthetic",
        description="Write toy data: 'task' makes an nnU-Net raw dataset (imagesTr/labelsTr/imagesTs, dataset.json) "
                    "in $nnUNet_raw; 'corpus' makes a folder of unlabelled CT volumes for nnssl_prepare_corpus.")
    sub = parser.add_subparsers(dest="kind", required=True)
    task = sub.add_parser("task", help="labelled task in nnU-Net raw format")
    task.add_argument("-d", dest="dataset_id", type=int, required=True, help="nnU-Net dataset id, e.g. 990")
    task.add_argument("-n", dest="name", default=None, help="dataset name (default SynthCT / SynthMRI)")
    task.add_argument("--cases", type=int, default=10, help="training cases (default 10)")
    task.add_argument("--test-cases", type=int, default=2, help="imagesTs cases (default 2)")
    task.add_argument("--modality", choices=("CT", "MRI"), default="CT")
    task.add_argument("--seed", type=int, default=0)
    corpus = sub.add_parser("corpus", help="unlabelled CT volumes (.nii.gz) in a folder")
    corpus.add_argument("-o", dest="out_dir", required=True)
    corpus.add_argument("--volumes", type=int, default=8)
    corpus.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    with exit_on_user_error("nnssl_make_synthetic"):
        from nnssl.data.synthetic import write_corpus, write_task
        from nnssl.paths import nnunet_raw

        if args.kind == "task":
            if not 1 <= args.dataset_id <= 999:
                raise NnsslError(f"Dataset id {args.dataset_id} must be between 1 and 999 (-d).")
            name = args.name or f"Synth{args.modality}"
            folder = write_task(nnunet_raw(), args.dataset_id, name, args.cases, args.test_cases, args.modality,
                                args.seed)
            print(f"wrote {folder}\nnext: nnUNetv2_plan_and_preprocess -d {args.dataset_id} -c 3d_fullres")
        else:
            if args.volumes < 1:
                raise NnsslError(f"--volumes must be at least 1, got {args.volumes}.")
            paths = write_corpus(Path(args.out_dir), args.volumes, seed=args.seed)
            print(f"wrote {len(paths)} volumes to {args.out_dir}\n"
                  f"next: nnssl_prepare_corpus -i {args.out_dir} -d 501 -n CTcorpus")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
