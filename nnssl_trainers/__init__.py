"""nnU-Net trainers for SwinUNETR fine-tuning (``nnUNetv2_train ... -tr SwinUNETR_<Method>_Trainer``).

Kept free of heavy imports: the ``nnssl_trainers.pth`` startup hook imports this package in every
Python process of the environment. Trainer classes load on first access.
"""
from __future__ import annotations

import importlib
from typing import Any


def __getattr__(name: str) -> Any:
    if name.startswith("SwinUNETR_") or name == "METHOD_TRAINERS":
        return getattr(importlib.import_module("nnssl_trainers.swinunetr"), name)
    raise AttributeError(f"module 'nnssl_trainers' has no attribute {name!r}")
