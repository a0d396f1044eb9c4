"""nnssl_export: an nnssl pretrained encoder as a checkpoint MONAI's SwinUNETR loads."""
from __future__ import annotations

import argparse

from nnssl.errors import exit_on_user_error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="nnssl_export",
        description="Write a pretrained encoder as a MONAI checkpoint: "
                    "SwinUNETR(out_channels=N, **ckpt['swinunetr_kwargs']).load_state_dict(ckpt['state_dict'], "
                    "strict=False) fills the network's swinViT. The file's 'usage' entry repeats these lines.")
    parser.add_argument("source", help="encoder_final.pth, or a run folder $nnssl_results/<method>/<run>")
    parser.add_argument("-o", dest="output", required=True, help="checkpoint to write, e.g. swin_dino.pt")
    args = parser.parse_args(argv)
    with exit_on_user_error("nnssl_export"):
        from nnssl.interop import USAGE, export_encoder

        output = export_encoder(source=args.source, output=args.output)
    print(f"Wrote {output}. Load it with:\n{USAGE.format(path=output)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
