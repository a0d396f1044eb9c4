"""nnssl_cka: layer-by-layer CKA between trained SwinUNETR models (feature reuse), or against their encoders."""
from __future__ import annotations

import argparse

from nnssl.cli import setup_logging
from nnssl.errors import exit_on_user_error


def main(argv: list[str] | None = None) -> int:
    from nnssl.analysis.cka_options import (CHECKPOINTS, DEFAULT_BATCH_SIZE, DEFAULT_PATCHES_PER_CASE, DEFAULT_POOL,
                                            KERNELS, LAYER_GROUPS)

    parser = argparse.ArgumentParser(
        prog="nnssl_cka",
        description="Compare trained SwinUNETR models layer by layer with minibatch CKA (Nguyen, Raghu & "
                    "Kornblith 2021) on identical patches of the validation cases of the first model's fold. "
                    "Writes cka.json, cka.csv, cka_heatmap.png and cka_diagonal.png.")
    parser.add_argument("models", nargs="+", metavar="FOLDER[:fold]",
                        help="nnU-Net trained-model folders ($nnUNet_results/DatasetXXX/<Trainer>__<plans>__<config>, "
                             "fold 0 unless :fold is given) or pretraining run folders "
                             "($nnssl_results/<method>/<run>); paths may be relative to those variables")
    parser.add_argument("--checkpoint", choices=sorted(CHECKPOINTS), default="final",
                        help="which nnU-Net checkpoint to load (default: final)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--cases", type=int, help="use the first N validation cases (default: all)")
    which.add_argument("--case-ids", nargs="+", help="use these preprocessed cases instead of the validation cases")
    parser.add_argument("--layers", choices=sorted(LAYER_GROUPS), default="all",
                        help="encoder: patch embedding and Swin stages; decoder: the convolutional blocks; all")
    parser.add_argument("--vs-pretrained", action="store_true",
                        help="also compare each fine-tuned model with the SSL encoder it started from")
    parser.add_argument("--patches-per-case", type=int, default=DEFAULT_PATCHES_PER_CASE,
                        help=f"patches cut from each case at seeded random positions "
                             f"(default {DEFAULT_PATCHES_PER_CASE})")
    parser.add_argument("--patch-size", type=int, nargs=3, metavar=("X", "Y", "Z"),
                        help="patch size, multiples of 32 (default: the first trained model's plans); smaller "
                             "patches give more distinct positions in small cases")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                        help=f"patches per HSIC minibatch, at least 4 (default {DEFAULT_BATCH_SIZE})")
    parser.add_argument("--pool", type=int, default=DEFAULT_POOL,
                        help=f"average-pool each activation to at most POOL^3 cells before flattening; 0: no "
                             f"pooling (default {DEFAULT_POOL})")
    parser.add_argument("--kernel", choices=KERNELS, default="linear", help="CKA kernel (default linear)")
    parser.add_argument("--rbf-sigma", type=float, default=0.8,
                        help="RBF bandwidth as a fraction of the median distance (default 0.8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the patch positions (default 0)")
    parser.add_argument("-device", "--device", dest="device", choices=("cuda", "cpu", "mps"),
                        help="default: cuda if available, else cpu")
    parser.add_argument("-o", dest="output", default="nnssl_cka", help="output folder (default ./nnssl_cka)")
    args = parser.parse_args(argv)
    setup_logging()
    with exit_on_user_error("nnssl_cka"):
        from nnssl.analysis.feature_reuse import run_cka

        result = run_cka(models=args.models, output=args.output, checkpoint=args.checkpoint, cases=args.cases,
                         case_ids=args.case_ids, layers=args.layers, vs_pretrained=args.vs_pretrained,
                         patches_per_case=args.patches_per_case, batch_size=args.batch_size, pool=args.pool,
                         kernel=args.kernel, rbf_sigma=args.rbf_sigma, seed=args.seed, device=args.device,
                         patch_size=args.patch_size)
    for comparison in result["comparisons"]:
        print(f"{comparison['a']} vs {comparison['b']}  (same-layer CKA)")
        for layer, value in comparison["diagonal"].items():
            print(f"  {layer:<12} {value:.3f}")
    print(f"wrote {args.output}/cka.json, cka.csv, cka_heatmap.png, cka_diagonal.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
