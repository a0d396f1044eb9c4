"""nnU-Net's own trainers as the study's reference, with nnssl's schedule knobs.

``nnUNetTrainer_nnsslSchedule`` is stock ``nnUNetTrainer`` (the CNN U-Net, SGD with nesterov momentum, poly
learning rate, deep supervision: nothing changed) and ``nnUNetTrainerAdam_nnsslSchedule`` nnU-Net's own AdamW
variant ``nnUNetTrainerAdam``, whose number of epochs and iterations per epoch come from the ``nnssl_num_epochs``
and ``nnssl_iterations_per_epoch`` knobs, so a shortened study (the demo, ``finetune_env`` in a plan) shortens
its baseline the same way as its SwinUNETR runs. Their CNN can be made narrower with ``nnssl_unet_base_features``
(nnU-Net's ``UNet_base_num_features``, 32: the first stage's features, doubled per stage up to the planned
maximum), for a baseline of CPU size such as the demo's. The narrowed architecture is written into the model
folder's plans.json (nnU-Net's record of the network, which nnUNetv2_predict builds from), and later folds of the
folder follow it. Like nnssl's trainers they honour ``OMP_NUM_THREADS`` on the CPU and save when told to stop
(SIGTERM, Slurm's signal). At paper scale, name plain ``nnUNetTrainer`` as the baseline.
"""
from __future__ import annotations

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.training.nnUNetTrainer.variants.optimizer.nnUNetTrainerAdam import nnUNetTrainerAdam
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnssl.errors import NnsslError, exit_on_user_error
from nnssl_trainers.knobs import env_positive
from nnssl_trainers.preemption import SaveOnSignal
from nnssl_trainers.shared_files import saved_model_plans


class NnsslSchedule(SaveOnSignal):
    """The knobs of a baseline trainer; mixed in before an nnU-Net trainer class."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        with exit_on_user_error("nnUNetv2_train"):
            self.num_epochs = env_positive("nnssl_num_epochs", int) or self.num_epochs
            iterations = env_positive("nnssl_iterations_per_epoch", int)
            threads = env_positive("OMP_NUM_THREADS", int)
            self._set_unet_features(env_positive("nnssl_unet_base_features", int))
        if iterations:
            self.num_iterations_per_epoch = iterations
            self.num_val_iterations_per_epoch = max(1, round(iterations / 5))  # nnU-Net's ratio, 50 of 250
        if self.device.type == "cpu" and threads:  # nnU-Net sets every core, ignoring it: parallel CPU jobs
            torch.set_num_threads(threads)

    def _set_unet_features(self, base: int | None) -> None:
        """``features_per_stage`` narrowed to ``base`` (or as this model folder was trained), in the configuration
        the network is built from and in the plans nnU-Net saves into the model folder."""
        kwargs = self.configuration_manager.network_arch_init_kwargs
        planned = list(kwargs["features_per_stage"])
        saved = self._saved_features()
        features = [min(base * 2 ** stage, planned[-1]) for stage in range(len(planned))] if base else saved or planned
        if saved is not None and saved != features:
            raise NnsslError(f"The model folder {self.output_folder_base} holds a CNN with features_per_stage {saved} "
                             f"(its plans.json), this training would build {features}: its folds must share one "
                             f"network. Set nnssl_unet_base_features={saved[0]} (or unset it if that is nnU-Net's "
                             f"plan), or train under another plans identifier (nnssl_align_plans --variant).")
        kwargs["features_per_stage"] = features
        configuration = self.plans_manager.plans["configurations"][self.configuration_name]
        configuration["architecture"] = self.configuration_manager.configuration["architecture"]

    def _saved_features(self) -> list[int] | None:
        plans = saved_model_plans(self.output_folder_base)
        if plans is None:
            return None
        return PlansManager(plans).get_configuration(self.configuration_name).network_arch_init_kwargs[
            "features_per_stage"]


class nnUNetTrainer_nnsslSchedule(NnsslSchedule, nnUNetTrainer):
    pass


class nnUNetTrainerAdam_nnsslSchedule(NnsslSchedule, nnUNetTrainerAdam):
    """AdamW instead of SGD: on short CPU schedules such as the demo's (150 iterations) the SGD CNN stays at
    predicting background on the synthetic CT, the AdamW one learns the organs."""
