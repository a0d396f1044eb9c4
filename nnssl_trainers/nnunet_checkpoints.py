"""Where a fine-tuning's weights come from, and nnU-Net checkpoints written and read safely.

``-pretrained_weights``, ``--c`` and ``--val`` decide whether a fold starts from an encoder file (loaded by
:class:`~nnssl_trainers.pretrained_encoder.PretrainedEncoder`) or restores an nnU-Net checkpoint; nnU-Net's own
``maybe_load_checkpoint`` is wrapped once, on import, so that the trainer decides before nnU-Net loads anything.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
from nnunetv2.run import run_training as nnunet_run_training

from nnssl.checkpoints import is_nnunet_checkpoint
from nnssl.errors import NnsslError, exit_on_user_error
from nnssl.io import atomic_path
from nnssl_trainers.knobs import PROG

NNUNET_CHECKPOINTS = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")  # the order --c tries


class NnunetCheckpoints:
    """Mixin for nnU-Net trainers with ``pretrain_method``: ``class T(NnunetCheckpoints, nnUNetTrainer)``.

    Sets ``loads_nnunet_weights`` (an nnU-Net checkpoint gives the weights, so no encoder is loaded) and
    ``encoder_checkpoint_path`` (an encoder file passed as ``-pretrained_weights``)."""

    pretrain_method: str | None
    loads_nnunet_weights: bool
    encoder_checkpoint_path: Path | None

    def route_checkpoints(self, continue_training: bool, validation_only: bool,
                          pretrained_weights: str | None) -> str | None:
        """Decide where this fold's weights come from, before nnU-Net's ``maybe_load_checkpoint`` runs.

        Returns the ``-pretrained_weights`` file nnU-Net should still load itself (an nnU-Net training
        checkpoint), or None. An encoder file is kept for ``initialize()``; with ``--c`` and a checkpoint
        of this fold present it is not needed (the nnU-Net checkpoint wins).
        """
        folder = Path(self.output_folder)
        resumable = any((folder / name).is_file() for name in NNUNET_CHECKPOINTS)
        if validation_only and not (folder / NNUNET_CHECKPOINTS[0]).is_file():
            raise NnsslError(f"--val needs a finished training, but {folder / NNUNET_CHECKPOINTS[0]} does not exist. "
                             f"Finish it first (add --c to continue an interrupted one).")
        self.loads_nnunet_weights = validation_only or (continue_training and resumable)
        if pretrained_weights is None:
            return None
        if self.pretrain_method is None:
            raise NnsslError(f"{type(self).__name__} trains from scratch; -pretrained_weights needs a method "
                             f"trainer, e.g. -tr SwinUNETR_SMIT_Trainer for a 'smit' encoder.")
        if not Path(pretrained_weights).is_file():
            raise NnsslError(f"-pretrained_weights {pretrained_weights} does not exist.")
        if is_nnunet_checkpoint(pretrained_weights):
            if continue_training:
                raise NnsslError(f"-pretrained_weights {pretrained_weights} is an nnU-Net training checkpoint, which "
                                 f"nnU-Net only loads at the start of a training; --c continues from this fold's own "
                                 f"checkpoint. Drop one of the two options.")
            self.loads_nnunet_weights = True
            return pretrained_weights
        self.encoder_checkpoint_path = Path(pretrained_weights)
        if self.loads_nnunet_weights:
            self.print_to_log_file(f"nnssl: --c/--val restore this fold's nnU-Net checkpoint; the encoder "
                                   f"{pretrained_weights} is not loaded")
        return None

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint, written atomically: a kill or a full disk while saving never leaves a truncated
        file (a full disk stops the training with a message naming the file and the free space)."""
        if self.local_rank != 0 or self.disable_checkpointing:
            super().save_checkpoint(filename)  # writes nothing; nnU-Net logs why
            return
        # through a Python file, so that a full disk is an OSError (ENOSPC), which atomic_path reports
        with exit_on_user_error(PROG), atomic_path(filename) as tmp, open(tmp, "wb") as file:
            super().save_checkpoint(file)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        if isinstance(filename_or_checkpoint, str):
            with exit_on_user_error(PROG):
                _check_nnunet_checkpoint(filename_or_checkpoint)
        try:
            super().load_checkpoint(filename_or_checkpoint)
        except RuntimeError as err:
            if "state_dict" not in str(err):
                raise
            with exit_on_user_error(PROG):
                raise NnsslError(
                    f"nnU-Net checkpoint {filename_or_checkpoint} does not fit the network built from "
                    f"{Path(self.output_folder_base) / 'plans.json'} (another backbone or trainer wrote it): "
                    f"{str(err).splitlines()[0]}"
                ) from None


def _check_nnunet_checkpoint(path: str) -> None:
    if not os.path.isfile(path):
        raise NnsslError(f"nnU-Net checkpoint {path} does not exist.")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # torch raises many types for truncated/corrupt zip files
        raise NnsslError(
            f"nnU-Net checkpoint {path} is truncated or corrupt ({type(err).__name__}). Delete it: --c then "
            f"continues from the fold's next checkpoint ({', '.join(NNUNET_CHECKPOINTS)}, in that order), or starts "
            f"the fold again if none is left."
        ) from None
    if not isinstance(blob, dict) or "network_weights" not in blob:
        raise NnsslError(f"{path} is not an nnU-Net training checkpoint (no 'network_weights').")


def _route_pretrained_weights(original):
    """Wrap nnU-Net's ``maybe_load_checkpoint`` so ``-pretrained_weights`` reaches our trainers.

    nnU-Net 2.8.1 loads ``-pretrained_weights`` itself after ``initialize()`` and demands every network
    key; an encoder-only file needs our route: the trainer loads it inside ``initialize()``. nnU-Net
    training checkpoints still go through nnU-Net's loader. The trainer also learns whether ``--c``/
    ``--val`` will restore an nnU-Net checkpoint, so that no SSL weights are needed then.
    """

    @functools.wraps(original)
    def maybe_load_checkpoint(nnunet_trainer, continue_training, validation_only, pretrained_weights_file=None):
        if isinstance(nnunet_trainer, NnunetCheckpoints):
            with exit_on_user_error(PROG):
                pretrained_weights_file = nnunet_trainer.route_checkpoints(continue_training, validation_only,
                                                                           pretrained_weights_file)
        return original(nnunet_trainer, continue_training, validation_only, pretrained_weights_file)

    maybe_load_checkpoint.nnssl_wrapped = True
    return maybe_load_checkpoint


if not getattr(nnunet_run_training.maybe_load_checkpoint, "nnssl_wrapped", False):
    nnunet_run_training.maybe_load_checkpoint = _route_pretrained_weights(nnunet_run_training.maybe_load_checkpoint)
