"""Which pretrained encoder a fine-tuning starts from, loading it into the new SwinUNETR, and recording it.

Where a method trainer's encoder comes from, first match wins: ``-pretrained_weights FILE``;
``$nnssl_results/<method>/$nnssl_run/encoder_final.pth``; the encoder the model folder's other folds started
from (recorded in its plans.json); the newest ``$nnssl_results/<method>/*/encoder_final.pth``.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from nnssl.checkpoints import (ENCODER_FILES, RUN_ENV, EncoderCheckpoint, describe_preset_difference,
                               find_encoder_checkpoint, load_encoder_file, load_encoder_weights, unwrap)
from nnssl.errors import NnsslError
from nnssl.networks import ENCODER_PREFIX, BackbonePreset
from nnssl.paths import nnssl_results
from nnssl_trainers.alignment import check_alignment, describe_alignment
from nnssl_trainers.imported import ENCODER_FILE_ENV, IMPORTED, imported_encoder_file
from nnssl_trainers.knobs import chosen_encoder


def encoder_fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the ``swinViT.*`` tensors (sorted by name): proves which weights a network started from."""
    digest = hashlib.sha256()
    for key in sorted(k for k in state_dict if k.startswith(ENCODER_PREFIX)):
        digest.update(key.encode())
        digest.update(state_dict[key].detach().cpu().contiguous().float().numpy().tobytes())
    return digest.hexdigest()


class PretrainedEncoder:
    """Mixin of the SwinUNETR trainer: finds, checks, loads and records the encoder of ``pretrain_method``.

    Uses the trainer's ``nnssl_settings`` (its plans.json section), ``_set_backbone`` and ``_backbone_origin``.
    """

    pretrain_method: str | None
    encoder_checkpoint_path: Path | None
    _tensors_loaded: int = 0  # swinViT tensors the last _build_and_load copied
    _encoder_origin: str  # which rule chose the encoder file, set by _encoder_path

    def _pretrained_encoder(self) -> EncoderCheckpoint:
        path = self._encoder_path()
        checkpoint = load_encoder_file(path)
        if self.pretrain_method != IMPORTED and checkpoint.method != self.pretrain_method:
            raise NnsslError(
                f"{self.__class__.__name__} fine-tunes '{self.pretrain_method}' encoders, but {path} was pretrained "
                f"with '{checkpoint.method}'. Use the trainer of that method or a '{self.pretrain_method}' checkpoint."
            )
        settings = self.nnssl_settings
        current = BackbonePreset.from_dict(settings["backbone"])
        if self._backbone_origin != "default" and checkpoint.preset != current:
            if self._backbone_origin == "saved model":
                where, remedy = (f"the model in {self.output_folder_base} was trained with",
                                 "move the model folder away to fine-tune this encoder")
            else:
                where, remedy = "nnssl_backbone asks for", "unset nnssl_backbone (the checkpoint's preset is used)"
            raise NnsslError(
                f"The encoder {path} was pretrained with backbone '{checkpoint.preset.name}', but {where} "
                f"'{current.name}'{describe_preset_difference(current, checkpoint.preset)}. Pick an encoder "
                f"pretrained with '{current.name}', or {remedy}."
            )
        self._set_backbone(checkpoint.preset)
        settings["backbone_from"] = f"encoder checkpoint {path}"
        return checkpoint

    def _encoder_path(self) -> Path:
        if self.encoder_checkpoint_path is not None:
            self._encoder_origin = "-pretrained_weights"
            return self.encoder_checkpoint_path
        previous = (self.nnssl_settings.get("pretrained") or {}).get("path")
        if self.pretrain_method == IMPORTED:
            self._encoder_origin = ENCODER_FILE_ENV if os.environ.get(ENCODER_FILE_ENV) else "the model's other folds"
            return imported_encoder_file(previous)
        choice, self._encoder_origin = chosen_encoder(self.pretrain_method)
        if (not os.environ.get(RUN_ENV) and previous and Path(previous).is_file()
                and Path(previous).name == ENCODER_FILES[choice]):
            return Path(previous)  # the encoder the model folder's other folds started from
        return find_encoder_checkpoint(self.pretrain_method, nnssl_results(), ENCODER_FILES[choice])

    def _build_and_load(self, checkpoint: EncoderCheckpoint, plans_manager: PlansManager,
                        configuration_manager: ConfigurationManager, num_input_channels: int,
                        num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        network = type(self).build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                        num_output_channels, enable_deep_supervision)
        self._tensors_loaded = load_encoder_weights(network, checkpoint)
        return network

    def _record_pretrained(self, checkpoint: EncoderCheckpoint) -> None:
        """Log and record (plans.json) which encoder the network starts from, as it is before iteration 0."""
        previous = self.nnssl_settings.get("pretrained") or {}
        record = {
            "path": str(checkpoint.path.resolve()),
            "method": checkpoint.method,
            "run": checkpoint.meta.get("run"),
            "step": checkpoint.meta.get("step"),
            "tensors_loaded": self._tensors_loaded,
            "checkpoint_in_channels": checkpoint.in_channels,
            "task_in_channels": self.num_input_channels,
            "pretraining_normalization": checkpoint.meta.get("normalization"),
            "task_normalization": list(self.configuration_manager.normalization_schemes),
            "encoder": checkpoint.meta.get("source", "student"),
            "encoder_from": self._encoder_origin,
            "checkpoint_sha256": encoder_fingerprint(checkpoint.state_dict),
            "encoder_sha256": encoder_fingerprint(unwrap(self.network).state_dict()),
        }
        if previous.get("checkpoint_sha256") not in (None, record["checkpoint_sha256"]):
            raise NnsslError(
                f"Fold {self.fold} would start from the encoder {record['path']}, but the other folds of "
                f"{self.output_folder_base} started from {previous.get('path')} (a different encoder). Folds of one "
                f"model folder must start from the same encoder: pass -pretrained_weights {previous.get('path')}, "
                f"or move the model folder away (or train into another one with a copied plans file, -p) to "
                f"fine-tune the new encoder."
            )
        self.nnssl_settings["pretrained"] = record
        alignment = check_alignment(checkpoint.meta, self.plans_manager.plans, self.configuration_name,
                                    self.plans_manager.dataset_name)
        self.nnssl_settings["alignment"] = alignment
        self.print_to_log_file(describe_alignment(alignment))
        self.print_to_log_file(
            f"nnssl: loaded {record['tensors_loaded']} pretrained swinViT tensors from {checkpoint.path} (method "
            f"{checkpoint.method}, backbone {checkpoint.preset.name}, input channels {checkpoint.in_channels} -> "
            f"{self.num_input_channels}, encoder sha256 {record['encoder_sha256'][:12]}); task normalization "
            f"{record['task_normalization']}, pretraining normalization {record['pretraining_normalization']}"
        )
