"""Where ``SwinUNETR_Imported_Trainer`` finds its encoder: an encoder from outside nnssl's own pretraining
(Tang et al.'s or VoCo's public weights converted by ``nnssl_import``), or any nnssl encoder file."""
from __future__ import annotations

import os
from pathlib import Path

from nnssl.errors import NnsslError

IMPORTED = "imported"  # the trainer's pretrain_method: it takes encoders of any method
ENCODER_FILE_ENV = "nnssl_encoder_file"


def imported_encoder_file(previous: str | None) -> Path:
    """``$nnssl_encoder_file``, else the encoder the model folder's other folds started from (``previous``).

    ``-pretrained_weights FILE`` is handled before this (it wins over both).
    """
    value = os.environ.get(ENCODER_FILE_ENV)
    if value:
        if not Path(value).is_file():
            raise NnsslError(f"{ENCODER_FILE_ENV}={value} does not exist. Make an encoder file from a public "
                             f"checkpoint with: nnssl_import CHECKPOINT -o {value}")
        return Path(value)
    if previous and Path(previous).is_file():
        return Path(previous)
    raise NnsslError("SwinUNETR_Imported_Trainer needs an encoder file: add -pretrained_weights FILE to "
                     f"nnUNetv2_train, or set {ENCODER_FILE_ENV}=FILE. Make one from a public checkpoint (MONAI, "
                     f"Tang et al., VoCo, SMIT) with: nnssl_import CHECKPOINT -o FILE")
