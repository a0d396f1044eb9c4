"""nnU-Net v2 trainers that fine-tune SwinUNETR, from scratch or from an nnssl-pretrained Swin encoder.

``nnUNetv2_train 003 3d_fullres 0 -tr SwinUNETR_SMIT_Trainer -device cpu`` finds these classes with no
path typed by the user (see ``nnssl_trainers/nnunet_discovery``). Run-time knobs, read from the
environment at the start of a training and saved in the model folder's ``plans.json``, so that
``nnUNetv2_predict`` and ``--c``/``--val`` rebuild the same network without them:

- ``nnssl_backbone``: Swin preset for trainers without a pretrained encoder (default ``paper``);
  pretrained trainers take the preset from the encoder checkpoint (setting a different one is an error).
  All folds of a model folder share its plans.json, so the backbone of a model folder never changes.
- ``nnssl_num_epochs``: number of epochs (default 1000, as nnU-Net).
- ``nnssl_iterations_per_epoch``: training iterations per epoch (default 250, as nnU-Net); validation
  iterations per epoch become a fifth of it (nnU-Net's ratio, 50 of 250).
- ``nnssl_save_every``: epochs between ``checkpoint_latest.pth`` writes (default 50, as nnU-Net); on
  preemptible machines a smaller value loses less to a kill, and ``--c`` continues from it.
- ``nnssl_lr``: peak learning rate of AdamW (default 1e-4, the SwinUNETR fine-tuning setting); short
  runs such as the demo's learn more with a higher one.
- ``nnssl_run``: which pretraining run of the method to use (default: the newest finished one).
- ``nnssl_encoder_file``: the encoder of ``SwinUNETR_Imported_Trainer`` (or ``-pretrained_weights FILE``).
- ``nnssl_encoder``: ``student`` or ``teacher``: which encoder of the run fine-tunes (default: the method plan's
  ``finetune_encoder``, teacher for DINO and iBOT); recorded with the file's fingerprint in plans.json.
- ``nnssl_seed``: seed of Python, NumPy, torch and the data-augmentation workers (default 0), recorded per fold in
  plans.json; the same seed gives the same checkpoint on the CPU (``nnssl_trainers.seeding``).
- ``nnssl_checkpointing``: ``1`` recomputes the Swin and decoder blocks in the backward pass instead of
  storing their activations (activation checkpointing: less GPU memory, same gradients); default ``0``.

At the start of a fine-tuning from an encoder, the task's plans are compared with what the encoder was
pretrained on (spacing, normalization and its numbers; ``nnssl_trainers.alignment``): both go into plans.json
and the log says "aligned" or warns with the numbers and the ``nnssl_align_plans`` command that aligns them.

Any other ``nnssl_*`` variable (``nnssl_results`` aside) is an error at the start: a misspelt knob would
otherwise be ignored (``nnssl_trainers/knobs.py`` lists them).

On the CPU the trainers honour ``OMP_NUM_THREADS`` (nnU-Net itself takes every core), so that
``nnssl_benchmark --device cpu --jobs N`` can run N trainings side by side.

Where a method trainer's encoder comes from: ``nnssl_trainers.pretrained_encoder``.
All folds of a model folder must start from the same encoder (an error says so otherwise), so a new
pretraining run never slips into half of a cross-validation. ``--c`` and ``--val`` restore the fold's
own nnU-Net checkpoint and load no encoder.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
import torch.distributed as dist
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from nnssl.checkpoints import describe_preset_difference
from nnssl.errors import NnsslError, exit_on_user_error
from nnssl.fewshot import NUM_MANY_SHOT_FOLDS, load_fewshot
from nnssl.io import CONCURRENT_WRITE_WAIT_S, load_json
from nnssl.methods.registry import trainer_names
from nnssl.networks import BackbonePreset, build_swinunetr, get_preset
from nnssl.networks.swinunetr import swin_patch_size
from nnssl.paths import nnunet_results
from nnssl.plans_variants import PLANS_KEY, apply_variant_knobs
from nnssl.provenance import provenance
from nnssl.random_state import seed_everything
from nnssl.schedules import EpochWarmupCosineLR
from nnssl_trainers.imported import IMPORTED
from nnssl_trainers.knobs import PROG, check_environment, env_flag, env_positive
from nnssl_trainers.nnunet_checkpoints import NnunetCheckpoints
from nnssl_trainers.preemption import SaveOnSignal
from nnssl_trainers.pretrained_encoder import PretrainedEncoder
from nnssl_trainers.seeding import DEFAULT_SEED, env_seed, ordered_augmenters, without_timed_choices
from nnssl_trainers.shared_files import safe_shared_json, saved_model_plans

DEFAULT_BACKBONE = "paper"


class SwinUNETR_Scratch_Trainer(SaveOnSignal, NnunetCheckpoints, PretrainedEncoder, nnUNetTrainer):
    """SwinUNETR fine-tuning recipe for nnU-Net; randomly initialised. Subclasses set ``pretrain_method``.

    Recipe (the SwinUNETR/SMIT fine-tuning setup inside nnU-Net's loop, data augmentation and
    DiceCE loss): AdamW, ``initial_lr`` 1e-4, ``weight_decay`` 1e-5, linear warmup over
    ``warmup_fraction`` of the epochs then cosine decay to 0, gradient-norm clipping at 12 (nnU-Net's
    ``train_step``), no deep supervision (SwinUNETR has one output), ``drop_path_rate`` 0 (MONAI's
    default). Patch sizes are nnU-Net's plan rounded to multiples of 32, as SwinUNETR requires.

    Pretrained encoders (method subclasses) load in ``initialize()``, right after the network is built
    and before nnU-Net compiles it or wraps it in DDP. A task with C input channels gets a
    single-channel encoder's patch embedding repeated C times and divided by C
    (:func:`nnssl.checkpoints.adapt_patch_embedding`). The task keeps its own nnU-Net normalization
    (e.g. CTNormalization, ZScoreNormalization for MRI); plans.json records it next to the encoder's.
    """

    pretrain_method: str | None = None  # subclasses name the nnssl_pretrain method and nothing else
    initial_lr_default = 1e-4
    weight_decay_default = 1e-5
    warmup_fraction = 0.02
    drop_path_rate = 0.0

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        continuing = bool(plans.get("continue_training", False))
        apply_variant_knobs(plans)  # a plans variant's knobs (an imported encoder's file), unless set by the user
        with exit_on_user_error(PROG):
            nnunet_results()  # nnU-Net would fail later with a bare traceback
            check_environment()
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.weight_decay = self.weight_decay_default
        self.enable_deep_supervision = False
        self.encoder_checkpoint_path: Path | None = None  # set from -pretrained_weights
        # An nnU-Net checkpoint (--c, --val, or an nnU-Net file as -pretrained_weights) gives the weights; the
        # wrapper around maybe_load_checkpoint refines this before initialize().
        self.loads_nnunet_weights = continuing
        with exit_on_user_error(PROG):
            self._configure()
            self._log_fewshot_fold()
            threads = env_positive("OMP_NUM_THREADS", int)
        if self.device.type == "cpu" and threads:  # nnU-Net sets every core, ignoring it: parallel CPU jobs
            torch.set_num_threads(threads)

    # -- settings -----------------------------------------------------------------------------------
    @property
    def nnssl_settings(self) -> dict:
        return self.plans_manager.plans["configurations"][self.configuration_name][PLANS_KEY]

    def _saved_settings(self) -> dict:
        """The nnssl section of this model folder's plans.json, if a training already wrote one."""
        plans = saved_model_plans(self.output_folder_base) or {"configurations": {}}
        return (plans["configurations"].get(self.configuration_name) or {}).get(PLANS_KEY) or {}

    def _configure(self) -> None:
        configuration = self.plans_manager.plans["configurations"][self.configuration_name]
        saved = self._saved_settings()
        backbone, self._backbone_origin = self._choose_backbone(saved)
        planned = saved.get("planned_patch_size") or list(self.configuration_manager.patch_size)

        def knob(variable: str, key: str, default: int | float) -> int | float:
            return env_positive(variable, type(default)) or saved.get(key) or default

        configuration[PLANS_KEY] = {
            "backbone": backbone.to_dict(),
            "backbone_from": saved.get("backbone_from") if saved else self._backbone_origin,
            "planned_patch_size": planned,
            "num_epochs": knob("nnssl_num_epochs", "num_epochs", self.num_epochs),
            "iterations_per_epoch": knob("nnssl_iterations_per_epoch", "iterations_per_epoch",
                                         self.num_iterations_per_epoch),
            "save_every": knob("nnssl_save_every", "save_every", self.save_every),
            "initial_lr": knob("nnssl_lr", "initial_lr", self.initial_lr_default),
            "checkpointing": next(v for v in (env_flag("nnssl_checkpointing"), saved.get("checkpointing"), False)
                                  if v is not None),
            "trainer": self.__class__.__name__,
            "pretrained": saved.get("pretrained"),
            # per fold: the folds of one model folder may be trained on other machines or software
            "provenance": {**(saved.get("provenance") or {}),
                           str(self.fold): provenance(self.device, dist.get_world_size() if self.is_ddp else 1)},
            "alignment": saved.get("alignment"),
            # per fold: the folds of one model folder share this plans.json
            "seeds": {**saved.get("seeds", {}), str(self.fold): env_seed() if env_seed() is not None else
                      saved.get("seeds", {}).get(str(self.fold), DEFAULT_SEED)},
        }
        self._set_backbone(backbone)
        settings = self.nnssl_settings
        self.num_epochs = settings["num_epochs"]
        self.num_iterations_per_epoch = settings["iterations_per_epoch"]
        self.num_val_iterations_per_epoch = max(1, round(self.num_iterations_per_epoch / 5))
        self.save_every = settings["save_every"]
        self.initial_lr = settings["initial_lr"]
        self.seed = settings["seeds"][str(self.fold)]

    def _choose_backbone(self, saved: dict) -> tuple[BackbonePreset, str]:
        """The preset of this model folder and where it comes from: "saved model", "environment" or "default"."""
        env_name = os.environ.get("nnssl_backbone") or None
        env = get_preset(env_name) if env_name else None
        if saved:
            preset = BackbonePreset.from_dict(saved["backbone"])
            if env is not None and env != preset:
                raise NnsslError(
                    f"The model in {self.output_folder_base} was trained with backbone '{preset.name}' but "
                    f"nnssl_backbone={env_name}{describe_preset_difference(env, preset)}. All folds of a model "
                    f"folder share its plans.json (nnUNetv2_predict rebuilds every fold from it), so the backbone "
                    f"cannot change: unset nnssl_backbone, or move the folder away to train the new backbone."
                )
            return preset, "saved model"
        if env is not None:
            return env, "environment"
        return get_preset(DEFAULT_BACKBONE), "default"

    def _set_backbone(self, preset: BackbonePreset) -> None:
        settings = self.nnssl_settings
        settings["backbone"] = preset.to_dict()
        configuration = self.plans_manager.plans["configurations"][self.configuration_name]
        before = list(configuration["patch_size"])
        configuration["patch_size"] = swin_patch_size(settings["planned_patch_size"], preset.divisor)
        # PlansManager caches resolved configurations; a new manager over the edited plans dict sees the edits.
        self.plans_manager = PlansManager(self.plans_manager.plans)
        self.configuration_manager = self.plans_manager.get_configuration(self.configuration_name)
        if before != configuration["patch_size"]:
            self.print_to_log_file(f"nnssl: patch size {settings['planned_patch_size']} -> "
                                   f"{configuration['patch_size']} (SwinUNETR needs multiples of {preset.divisor})")

    def _log_fewshot_fold(self) -> None:
        if self.preprocessed_dataset_folder_base is None:
            return
        entry = load_fewshot(Path(self.preprocessed_dataset_folder_base)).get(str(self.fold))
        if entry:
            uncovered = f"; labels none of its cases hold: {entry['uncovered_labels']}" \
                if entry.get("uncovered_labels") else ""
            self.print_to_log_file(f"nnssl: fold {self.fold} is the {entry['shots']}-shot fold drawn from fold "
                                   f"{entry['base_fold']} (seed {entry['seed']}, see fewshot.json){uncovered}")

    def do_split(self):
        # nnU-Net silently trains on a random 80:20 split for a fold missing from splits_final.json; for a
        # few-shot study that would be a wrong run nobody notices
        if self.fold != "all" and self.preprocessed_dataset_folder_base is not None:
            splits_file = Path(self.preprocessed_dataset_folder_base) / "splits_final.json"
            available = (len(load_json(splits_file, wait_s=CONCURRENT_WRITE_WAIT_S)) if splits_file.is_file()
                         else NUM_MANY_SHOT_FOLDS)
            if int(self.fold) >= available:
                with exit_on_user_error(PROG):
                    raise NnsslError(
                        f"Fold {self.fold} is not in {splits_file} ({available} folds: 0-{available - 1}). Few-shot "
                        f"folds are added by: nnssl_fewshot {self.plans_manager.dataset_name} --shots 1 5 10")
        with safe_shared_json():  # concurrent folds may create splits_final.json
            return super().do_split()

    def on_train_start(self) -> None:
        with safe_shared_json():  # every fold of the model folder writes its plans.json and dataset.json now
            super().on_train_start()

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
                               drop_path_rate=SwinUNETR_Scratch_Trainer.drop_path_rate,
                               use_checkpoint=bool(settings.get("checkpointing", False)))

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        """SwinUNETR has a single output; nothing to switch."""

    def initialize(self) -> None:
        seed_everything(self.seed)  # before the network's initial weights are drawn
        with exit_on_user_error(PROG):
            checkpoint = None
            if self.pretrain_method is not None and self.loads_nnunet_weights:
                self.print_to_log_file("nnssl: the weights come from an nnU-Net checkpoint; no pretrained encoder "
                                       "is loaded")
            elif self.pretrain_method is not None:
                checkpoint = self._pretrained_encoder()
                # Load right after the network is built, before nnU-Net compiles it or wraps it in DDP.
                self.build_network_architecture = functools.partial(self._build_and_load, checkpoint)
            try:
                super().initialize()
            finally:
                self.__dict__.pop("build_network_architecture", None)
            if checkpoint is not None:
                self._record_pretrained(checkpoint)

    def get_dataloaders(self):
        """nnU-Net's loaders, seeded: with DA workers an order-preserving augmenter (see nnssl_trainers.seeding)."""
        self.print_to_log_file(f"nnssl: seed {self.seed} (nnssl_seed) for Python, NumPy, torch and the "
                               f"data-augmentation workers")
        with ordered_augmenters(self.seed):
            return super().get_dataloaders()

    @staticmethod
    def get_training_transforms(*args, **kwargs):
        """nnU-Net's training transforms, without the blur that picks its method by timing (nnssl_trainers.seeding)."""
        return without_timed_choices(nnUNetTrainer.get_training_transforms(*args, **kwargs))

    # -- optimisation ---------------------------------------------------------------------------------
    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.network.parameters(), lr=self.initial_lr, weight_decay=self.weight_decay)
        warmup_epochs = max(1, round(self.warmup_fraction * self.num_epochs)) if self.num_epochs > 1 else 0
        return optimizer, EpochWarmupCosineLR(optimizer, self.initial_lr, self.num_epochs, warmup_epochs)


def _method_trainer(method: str, name: str) -> type[SwinUNETR_Scratch_Trainer]:
    """The trainer class ``name`` that fine-tunes ``method``'s encoders, found in $nnssl_results/<method>/."""
    return type(name, (SwinUNETR_Scratch_Trainer,), {
        "pretrain_method": method, "__module__": __name__, "__qualname__": name,
        "__doc__": f"SwinUNETR initialised from the newest '{method}' encoder (nnssl_pretrain -m {method})."})


# One trainer per SSL method, named by the method registry (register_method(..., trainer=NAME)).
METHOD_TRAINERS = {method: _method_trainer(method, name) for method, name in trainer_names().items()}
globals().update({cls.__name__: cls for cls in METHOD_TRAINERS.values()})


class SwinUNETR_Imported_Trainer(SwinUNETR_Scratch_Trainer):
    """Any encoder file, whatever its method: public weights converted by nnssl_import (MONAI, Tang et al.,
    VoCo, SMIT), named by ``-pretrained_weights FILE`` or ``nnssl_encoder_file=FILE``."""

    pretrain_method = IMPORTED


__all__ = ["SwinUNETR_Scratch_Trainer", "SwinUNETR_Imported_Trainer",
           *(cls.__name__ for cls in METHOD_TRAINERS.values())]
