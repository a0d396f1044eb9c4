"""Run-time knobs of nnssl's nnU-Net trainers: ``nnssl_*`` environment variables read when a training starts.

Every knob a trainer reads is listed in :data:`KNOBS` (name -> what it sets), so that the README's table, the
trainers and the check for misspelt names read one list.
"""
from __future__ import annotations

import math
import os

from nnssl.errors import NnsslError
from nnssl.plans import ENCODER_CHOICES, did_you_mean, finetune_encoder

KNOBS: dict[str, str] = {
    "nnssl_backbone": "Swin preset of trainers without a pretrained encoder (paper, monai, tiny)",
    "nnssl_num_epochs": "number of epochs",
    "nnssl_iterations_per_epoch": "training iterations per epoch (validation iterations: a fifth)",
    "nnssl_save_every": "epochs between checkpoint_latest.pth writes",
    "nnssl_lr": "peak AdamW learning rate",
    "nnssl_run": "which pretraining run of the method the trainer uses",
    "nnssl_encoder": "which encoder of the pretraining run fine-tunes: student or teacher",
    "nnssl_seed": "seed of Python, NumPy, torch and the data-augmentation workers",
    "nnssl_checkpointing": "1: activation checkpointing (recompute Swin and decoder blocks in the backward "
                           "pass: less GPU memory, more compute, same gradients); 0: off",
    "nnssl_encoder_file": "encoder file of SwinUNETR_Imported_Trainer (instead of -pretrained_weights)",
    "nnssl_unet_base_features": "features of the first stage of the nnU-Net baselines' CNN (nnU-Net: 32), "
                                "doubled per stage up to the planned maximum",
}
PROG = "nnUNetv2_train"  # the command whose errors the trainers print
FOLDER_VARIABLES = ("nnssl_results",)  # nnssl_* variables that name folders (nnssl.paths), not trainer knobs


def env_flag(name: str) -> bool | None:
    """The on/off switch in environment variable ``name`` (``1``/``0``, also ``true``/``false`` as nnU-Net's
    ``nnUNet_compile``), or None when it is unset or empty."""
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    if value.strip().lower() in ("1", "true", "t"):
        return True
    if value.strip().lower() in ("0", "false", "f"):
        return False
    raise NnsslError(f"Environment variable {name}={value!r} must be 1 (on) or 0 (off), e.g. {name}=1.")


def env_positive(name: str, kind: type[int] | type[float]) -> int | float | None:
    """The positive ``kind`` in environment variable ``name``, or None when it is unset or empty."""
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        number = kind(value)
    except ValueError:
        number = 0
    if not (math.isfinite(number) and number > 0):
        what, example = ("whole number", "5") if kind is int else ("number", "3e-4")
        raise NnsslError(f"Environment variable {name}={value!r} must be a positive {what}, e.g. {name}={example}.")
    return number


def check_environment() -> None:
    """Refuse ``nnssl_*`` environment variables that are neither knobs nor folders: a misspelt knob
    (``nnssl_epochs=50``) would otherwise be ignored in silence and the training run with the default."""
    known = sorted([*KNOBS, *FOLDER_VARIABLES])
    unknown = sorted(name for name in os.environ if name.startswith("nnssl_") and name not in known)
    if unknown:
        hints = " ".join(f"{name}:{did_you_mean(name, known) or ' no close match.'}" for name in unknown)
        raise NnsslError(f"Unknown nnssl environment variable(s) {unknown}; nnssl's trainers would ignore them. "
                         f"{hints} Known: {', '.join(known)}. Unset the variable (unset NAME) or fix its name.")


def chosen_encoder(method: str) -> tuple[str, str]:
    """Which encoder of a ``method``'s run fine-tunes ("student" or "teacher") and who chose it: ``nnssl_encoder``,
    else the method plan's ``finetune_encoder``."""
    value = os.environ.get("nnssl_encoder", "")
    if value:
        if value not in ENCODER_CHOICES:
            raise NnsslError(f"Environment variable nnssl_encoder={value!r} must be one of {list(ENCODER_CHOICES)}.")
        return value, "nnssl_encoder"
    return finetune_encoder(method), f"plans/pretrain/{method}.json finetune_encoder"
