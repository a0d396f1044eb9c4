"""nnssl_import: a MONAI/Tang Swin UNETR or SMIT checkpoint as an nnssl encoder_final.pth."""
from __future__ import annotations

import argparse

from nnssl.errors import exit_on_user_error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="nnssl_import",
        description="Convert a published Swin encoder into nnssl's encoder_final.pth, so the SwinUNETR_<Method>_"
                    "Trainer (or SwinUNETR_Imported_Trainer) fine-tunes it (-pretrained_weights FILE). Reads MONAI/Tang "
                    "model_swinvit.pt-style state dicts, MONAI tutorial checkpoints (ssl_pretrained_weights.pth), "
                    "VoCo's released SwinUNETR weights and SMIT reference checkpoints (patch-merging order "
                    "converted); lists every tensor it could not use.")
    parser.add_argument("source", help="checkpoint to convert, e.g. model_swinvit.pt")
    parser.add_argument("-o", dest="output", required=True, help="encoder file to write, e.g. encoder_final.pth")
    parser.add_argument("--method", default=None,
                        help="method recorded in the file, choosing the trainer that accepts it (default: the one "
                             "an nnssl_export file names, smit for SMIT checkpoints, swinssl for MONAI/Tang ones, "
                             "imported for VoCo's; SwinUNETR_Imported_Trainer takes any)")
    parser.add_argument("--backbone", default=None,
                        help="backbone preset the checkpoint must match (default: inferred from tensor shapes)")
    parser.add_argument("--key", default=None,
                        help="checkpoint entry holding the weights (default: state_dict, student or model)")
    args = parser.parse_args(argv)
    with exit_on_user_error("nnssl_import"):
        from nnssl.interop import import_encoder

        report = import_encoder(source=args.source, output=args.output, method=args.method, backbone=args.backbone,
                                key=args.key)
    print(report.summary())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
