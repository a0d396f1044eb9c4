"""nnU-Net v2 trainers that fine-tune SwinUNETR, from scratch or from an nnssl-pretrained Swin encoder.

``nnUNetv2_train 003 3d_fullres 0 -tr SwinUNETR_SMIT_Trainer -device cpu`` finds these classes with no
path typed by the user (see ``nnssl_trainers/nnunet_discovery``). Run-time knobs, read from the
environment at the start of a training and saved in the model folder's ``plans.json``, so that
``nnUNetv2_predict`` and ``--c``/``--val`` rebuild the same network without them:

- ``nnssl_backbone``: Swin preset for trainers without a pretrained encoder (default ``paper``);
  pretrained trainers take the preset from the encoder checkpoint (setting a different one is an error).
- ``nnssl_num_epochs``: number of epochs (default 1000, as nnU-Net).
- ``nnssl_iterations_per_epoch``: training iterations per epoch (default 250, as nnU-Net); validation
  iterations per epoch become a fifth of it (nnU-Net's ratio, 50 of 250).
- ``nnssl_run``: which pretraining run of the method to use (default: the newest finished one).
"""
from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import torch
from nnunetv2.run import run_training as nnunet_run_training
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from nnssl.checkpoints import (EncoderCheckpoint, find_encoder_checkpoint, is_nnunet_checkpoint, load_encoder_file,
                               load_encoder_weights, unwrap)
from nnssl.errors import NnsslError, exit_on_user_error
from nnssl.io import load_json
from nnssl.networks import BackbonePreset, ENCODER_PREFIX, build_swinunetr, get_preset
from nnssl.networks.swinunetr import swin_patch_size
from nnssl.paths import nnssl_results, nnunet_results
from nnssl.schedules import EpochWarmupCosineLR

PLANS_KEY = "nnssl"  # our section inside the configuration of the plans the trainer saves
DEFAULT_BACKBONE = "paper"
PROG = "nnUNetv2_train"


def _env_positive_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number <= 0:
        raise NnsslError(f"Environment variable {name}={value!r} must be a positive whole number, e.g. {name}=5.")
    return number


def encoder_fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the ``swinViT.*`` tensors (sorted by name): proves which weights a network started from."""
    digest = hashlib.sha256()
    for key in sorted(k for k in state_dict if k.startswith(ENCODER_PREFIX)):
        digest.update(key.encode())
        digest.update(state_dict[key].detach().cpu().contiguous().float().numpy().tobytes())
    return digest.hexdigest()


class SwinUNETR_Scratch_Trainer(nnUNetTrainer):
    """SwinUNETR fine-tuning recipe for nnU-Net; randomly initialised. Subclasses set ``pretrain_method``.

    Recipe (the SwinUNETR/SMIT fine-tuning setup inside nnU-Net's loop, data augmentation and
    DiceCE loss): AdamW, ``initial_lr`` 1e-4, ``weight_decay`` 1e-5, linear warmup over
    ``warmup_fraction`` of the epochs then cosine decay to 0, gradient-norm clipping at 12 (nnU-Net's
    ``train_step``), no deep supervision (SwinUNETR has one output), ``drop_path_rate`` 0 (MONAI's
    default). Patch sizes are nnU-Net's plan rounded to multiples of 32, as SwinUNETR requires.
    """

    pretrain_method: str | None = None  # subclasses name the nnssl_pretrain method and nothing else
    initial_lr_default = 1e-4
    weight_decay_default = 1e-5
    warmup_fraction = 0.02
    drop_path_rate = 0.0

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        continuing = bool(plans.get("continue_training", False))
        with exit_on_user_error(PROG):
            nnunet_results()  # nnU-Net would fail later with a bare traceback
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = self.initial_lr_default
        self.weight_decay = self.weight_decay_default
        self.enable_deep_supervision = False
        self.encoder_checkpoint_path: Path | None = None  # set from -pretrained_weights
        self.restores_nnunet_checkpoint = continuing  # --c/--val: nnU-Net's checkpoint wins over SSL weights
        with exit_on_user_error(PROG):
            self._configure(continuing)

    # -- settings -----------------------------------------------------------------------------------
    @property
    def nnssl_settings(self) -> dict:
        return self.plans_manager.plans["configurations"][self.configuration_name][PLANS_KEY]

    def _saved_settings(self) -> dict | None:
        """The nnssl section of this model folder's plans.json, if a training already wrote one."""
        saved = Path(self.output_folder_base) / "plans.json"
        if not saved.is_file():
            return None
        return load_json(saved)["configurations"].get(self.configuration_name, {}).get(PLANS_KEY)

    def _configure(self, continuing: bool) -> None:
        configuration = self.plans_manager.plans["configurations"][self.configuration_name]
        saved = self._saved_settings()
        env_backbone = os.environ.get("nnssl_backbone") or None
        if env_backbone is not None:
            backbone = get_preset(env_backbone)
            if continuing and saved and saved["backbone"]["name"] != backbone.name:
                raise NnsslError(
                    f"The model in {self.output_folder_base} was trained with backbone '{saved['backbone']['name']}' "
                    f"but nnssl_backbone={env_backbone}. Unset nnssl_backbone (the saved one is used) or set it "
                    f"to {saved['backbone']['name']}."
                )
        elif saved:
            backbone = BackbonePreset.from_dict(saved["backbone"])
        else:
            backbone = get_preset(DEFAULT_BACKBONE)
        planned = (saved or {}).get("planned_patch_size") or list(self.configuration_manager.patch_size)
        settings = {
            "backbone": backbone.to_dict(),
            "backbone_from": "environment" if env_backbone else ("saved model" if saved else "default"),
            "planned_patch_size": planned,
            "num_epochs": _env_positive_int("nnssl_num_epochs") or (saved or {}).get("num_epochs") or self.num_epochs,
            "iterations_per_epoch": _env_positive_int("nnssl_iterations_per_epoch")
            or (saved or {}).get("iterations_per_epoch") or self.num_iterations_per_epoch,
            "trainer": self.__class__.__name__,
            "pretrained": (saved or {}).get("pretrained"),
        }
        configuration["patch_size"] = swin_patch_size(planned, backbone.divisor)
        configuration[PLANS_KEY] = settings
        self._refresh_configuration()
        self.num_epochs = settings["num_epochs"]
        self.num_iterations_per_epoch = settings["iterations_per_epoch"]
        self.num_val_iterations_per_epoch = max(1, round(self.num_iterations_per_epoch / 5))
        if planned != configuration["patch_size"]:
            self.print_to_log_file(f"nnssl: patch size {planned} -> {configuration['patch_size']} "
                                   f"(SwinUNETR needs multiples of {backbone.divisor})")

    def _set_backbone(self, preset: BackbonePreset) -> None:
        settings = self.nnssl_settings
        settings["backbone"] = preset.to_dict()
        configuration = self.plans_manager.plans["configurations"][self.configuration_name]
        configuration["patch_size"] = swin_patch_size(settings["planned_patch_size"], preset.divisor)
        self._refresh_configuration()

    def _refresh_configuration(self) -> None:
        # PlansManager caches resolved configurations; a new manager over the edited plans dict sees the edits.
        self.plans_manager = PlansManager(self.plans_manager.plans)
        self.configuration_manager = self.plans_manager.get_configuration(self.configuration_name)

    # -- network --------------------------------------------------------------------------------------
    @staticmethod
    def build_network_architecture(plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        # Also called by nnUNetv2_predict: builds only (from the plans the trainer saved), never loads weights.
        settings = configuration_manager.configuration.get(PLANS_KEY)
        if settings is None:
            raise NnsslError(
                "These plans have no 'nnssl' section, so the SwinUNETR cannot be rebuilt. Use the plans.json "
                "of a model folder trained with an nnssl SwinUNETR trainer."
            )
        preset = BackbonePreset.from_dict(settings["backbone"])
        return build_swinunetr(preset, num_input_channels, num_output_channels,
                               drop_path_rate=SwinUNETR_Scratch_Trainer.drop_path_rate)

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        """SwinUNETR has a single output; nothing to switch."""

    def initialize(self) -> None:
        with exit_on_user_error(PROG):
            if self.pretrain_method is not None and not self.restores_nnunet_checkpoint:
                checkpoint = self._pretrained_encoder()
                # Load right after the network is built, before nnU-Net compiles it or wraps it in DDP.
                self.build_network_architecture = functools.partial(self._build_and_load, checkpoint)
            super().initialize()

    def _build_and_load(self, checkpoint: EncoderCheckpoint, plans_manager: PlansManager,
                        configuration_manager: ConfigurationManager, num_input_channels: int,
                        num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        network = type(self).build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                        num_output_channels, enable_deep_supervision)
        loaded = load_encoder_weights(network, checkpoint)
        normalization = configuration_manager.normalization_schemes
        record = {
            "path": str(checkpoint.path.resolve()),
            "method": checkpoint.method,
            "run": checkpoint.meta.get("run"),
            "step": checkpoint.meta.get("step"),
            "tensors_loaded": loaded,
            "checkpoint_in_channels": checkpoint.in_channels,
            "task_in_channels": num_input_channels,
            "pretraining_normalization": checkpoint.meta.get("normalization"),
            "task_normalization": normalization,
            "encoder_sha256": encoder_fingerprint(unwrap(network).state_dict()),
        }
        self.nnssl_settings["pretrained"] = record
        self.print_to_log_file(
            f"nnssl: loaded {loaded} pretrained swinViT tensors from {checkpoint.path} (method "
            f"{checkpoint.method}, backbone {checkpoint.preset.name}, input channels {checkpoint.in_channels} -> "
            f"{num_input_channels}); task normalization {normalization}, pretraining normalization "
            f"{checkpoint.meta.get('normalization')}"
        )
        return network

    def _pretrained_encoder(self) -> EncoderCheckpoint:
        path = self.encoder_checkpoint_path or find_encoder_checkpoint(self.pretrain_method, nnssl_results())
        checkpoint = load_encoder_file(path)
        if checkpoint.method != self.pretrain_method:
            raise NnsslError(
                f"{self.__class__.__name__} fine-tunes '{self.pretrain_method}' encoders, but {path} was pretrained "
                f"with '{checkpoint.method}'. Use the trainer of that method or a '{self.pretrain_method}' checkpoint."
            )
        env_backbone = os.environ.get("nnssl_backbone")
        if env_backbone and env_backbone != checkpoint.preset.name:
            raise NnsslError(
                f"nnssl_backbone={env_backbone}, but the encoder {path} was pretrained with backbone "
                f"'{checkpoint.preset.name}'. Unset nnssl_backbone (the checkpoint's preset is used) or pick a "
                f"checkpoint pretrained with '{env_backbone}'."
            )
        self._set_backbone(checkpoint.preset)
        self.nnssl_settings["backbone_from"] = f"encoder checkpoint {path}"
        return checkpoint

    # -- optimisation ---------------------------------------------------------------------------------
    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.network.parameters(), lr=self.initial_lr, weight_decay=self.weight_decay)
        warmup_epochs = max(1, round(self.warmup_fraction * self.num_epochs)) if self.num_epochs > 1 else 0
        return optimizer, EpochWarmupCosineLR(optimizer, self.initial_lr, self.num_epochs, warmup_epochs)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        with exit_on_user_error(PROG):
            if isinstance(filename_or_checkpoint, str) and not os.path.isfile(filename_or_checkpoint):
                raise NnsslError(f"nnU-Net checkpoint {filename_or_checkpoint} does not exist.")
        super().load_checkpoint(filename_or_checkpoint)


def _route_pretrained_weights(original):
    """Wrap nnU-Net's ``maybe_load_checkpoint`` so ``-pretrained_weights`` reaches our trainers.

    nnU-Net 2.8.1 loads ``-pretrained_weights`` itself after ``initialize()`` and demands every network
    key; an encoder-only file needs our route: the trainer loads it inside ``initialize()``. nnU-Net
    training checkpoints still go through nnU-Net's loader. The wrapper also tells the trainer when
    ``--c``/``--val`` will restore an nnU-Net checkpoint, so no SSL weights are needed then.
    """

    @functools.wraps(original)
    def maybe_load_checkpoint(nnunet_trainer, continue_training, validation_only, pretrained_weights_file=None):
        if isinstance(nnunet_trainer, SwinUNETR_Scratch_Trainer):
            folder = Path(nnunet_trainer.output_folder)
            has_checkpoint = any((folder / n).is_file() for n in
                                 ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth"))
            nnunet_trainer.restores_nnunet_checkpoint = validation_only or (continue_training and has_checkpoint)
            if pretrained_weights_file is not None and not continue_training:
                with exit_on_user_error(PROG):
                    if nnunet_trainer.pretrain_method is None:
                        raise NnsslError(
                            f"{type(nnunet_trainer).__name__} trains from scratch; -pretrained_weights needs a "
                            f"method trainer, e.g. -tr SwinUNETR_SMIT_Trainer for a 'smit' encoder."
                        )
                if not is_nnunet_checkpoint(pretrained_weights_file):
                    nnunet_trainer.encoder_checkpoint_path = Path(pretrained_weights_file)
                    pretrained_weights_file = None
        return original(nnunet_trainer, continue_training, validation_only, pretrained_weights_file)

    maybe_load_checkpoint.nnssl_wrapped = True
    return maybe_load_checkpoint


if not getattr(nnunet_run_training.maybe_load_checkpoint, "nnssl_wrapped", False):
    nnunet_run_training.maybe_load_checkpoint = _route_pretrained_weights(nnunet_run_training.maybe_load_checkpoint)


# One trainer per SSL method; each finds its encoder in $nnssl_results/<pretrain_method>/.
class SwinUNETR_SimCLR_Trainer(SwinUNETR_Scratch_Trainer):
    pretrain_method = "simclr"


class SwinUNETR_MoCoV3_Trainer(SwinUNETR_Scratch_Trainer):
    pretrain_method = "mocov3"


class SwinUNETR_BYOL_Trainer(SwinUNETR_Scratch_Trainer):
    pretrain_method = "byol"


class SwinUNETR_RotNet_Trainer(SwinUNETR_Scratch_Trainer):
    pretrain_method = "rotnet"


class SwinUNETR_SwinSSL_Trainer(SwinUNETR_Scratch_Trainer):
    pretrain_method = "swinssl"


class SwinUNETR_SimMIM_Trainer(SwinUNETR_Scratch_Trainer):
    pretrain_method = "simmim"


class SwinUNETR_DINO_Trainer(SwinUNETR_Scratch_Trainer):
    pretrain_method = "dino"


class SwinUNETR_iBOT_Trainer(SwinUNETR_Scratch_Trainer):
    pretrain_method = "ibot"


class SwinUNETR_SMIT_Trainer(SwinUNETR_Scratch_Trainer):
    pretrain_method = "smit"


METHOD_TRAINERS = {cls.pretrain_method: cls for cls in SwinUNETR_Scratch_Trainer.__subclasses__()}

__all__ = ["SwinUNETR_Scratch_Trainer", *(cls.__name__ for cls in METHOD_TRAINERS.values())]
