"""Imported by nnU-Net's trainer search (as a top-level module); re-exports the real classes."""
from nnssl_trainers.swinunetr import *  # noqa: F401,F403
from nnssl_trainers.baseline import nnUNetTrainer_nnsslSchedule, nnUNetTrainerAdam_nnsslSchedule  # noqa: F401
