"""nnssl_fewshot: add nested few-shot folds to a dataset's nnU-Net cross-validation split."""
from __future__ import annotations

import argparse

from nnssl.errors import exit_on_user_error
from nnssl.fewshot import FEWSHOT_FILENAME, SPLITS_FILENAME, add_fewshot_folds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="nnssl_fewshot",
        description=f"Append few-shot folds to $nnUNet_preprocessed/DatasetXXX/{SPLITS_FILENAME} (made with "
                    f"nnU-Net's default 5-fold split if missing). Each new fold trains on a seeded subset of a "
                    f"many-shot fold's training cases (1-shot inside 5-shot inside 10-shot) and validates on that "
                    f"fold's validation cases; {FEWSHOT_FILENAME} records fold -> (base fold, shots, seed). "
                    f"Existing folds never change; running it again adds nothing.")
    parser.add_argument("dataset", nargs="?", help="nnU-Net dataset id or name, e.g. 3 or Dataset003_Liver")
    parser.add_argument("-d", dest="dataset_option", metavar="DATASET", help="the dataset, nnU-Net's spelling")
    parser.add_argument("--shots", type=int, nargs="+", required=True, metavar="N",
                        help="training cases per few-shot fold, e.g. --shots 1 5 10")
    parser.add_argument("--folds", "-f", type=int, nargs="+", default=None, metavar="F",
                        help="many-shot folds to draw from (default: 0 1 2 3 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the case selection (default 0)")
    args = parser.parse_args(argv)
    if (args.dataset is None) == (args.dataset_option is None):
        parser.error("name the dataset once: nnssl_fewshot DATASET ... or nnssl_fewshot -d DATASET ...")
    with exit_on_user_error("nnssl_fewshot"):
        folds = add_fewshot_folds(dataset=args.dataset or args.dataset_option, shots=args.shots, folds=args.folds, seed=args.seed)
    print(f"{'fold':>5} {'base':>5} {'shots':>6} {'seed':>5} {'train':>6} {'val':>5}  status")
    for f in folds:
        print(f"{f.fold:>5} {f.base_fold:>5} {f.shots:>6} {f.seed:>5} {f.num_train:>6} {f.num_val:>5}  "
              f"{'added' if f.added else 'exists'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
