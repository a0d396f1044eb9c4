"""nnU-Net's own trainer as the study's reference, with nnssl's schedule knobs.

``nnUNetTrainer_nnsslSchedule`` is stock ``nnUNetTrainer`` (the CNN U-Net, SGD with nesterov momentum, poly
learning rate, deep supervision: nothing changed) whose number of epochs and iterations per epoch come from
the ``nnssl_num_epochs`` and ``nnssl_iterations_per_epoch`` knobs, so a shortened study (the demo,
``finetune_env`` in a plan) shortens its baseline the same way as its SwinUNETR runs. Like nnssl's trainers
it honours ``OMP_NUM_THREADS`` on the CPU and saves when it is told to stop (SIGTERM, Slurm's signal). At paper scale, name plain ``nnUNetTrainer`` as the baseline.
"""
from __future__ import annotations

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnssl.errors import exit_on_user_error
from nnssl_trainers.knobs import env_positive
from nnssl_trainers.preemption import SaveOnSignal


class nnUNetTrainer_nnsslSchedule(SaveOnSignal, nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        with exit_on_user_error("nnUNetv2_train"):
            self.num_epochs = env_positive("nnssl_num_epochs", int) or self.num_epochs
            iterations = env_positive("nnssl_iterations_per_epoch", int)
            threads = env_positive("OMP_NUM_THREADS", int)
        if iterations:
            self.num_iterations_per_epoch = iterations
            self.num_val_iterations_per_epoch = max(1, round(iterations / 5))  # nnU-Net's ratio, 50 of 250
        if self.device.type == "cpu" and threads:  # nnU-Net sets every core, ignoring it: parallel CPU jobs
            torch.set_num_threads(threads)
