"""nnU-Net's reads and writes of the JSON files that concurrent folds share, made safe for them.

All folds of a model folder write its ``plans.json`` and ``dataset.json`` at the start of training
(``nnUNetTrainer.on_train_start``), and the first fold of a dataset without ``splits_final.json`` writes that one
(``nnUNetTrainer.do_split``), each with a plain ``open``/``json.dump``: a fold starting a moment later can read a
half-written file. Inside :func:`safe_shared_json` those writes are atomic and serialized by a lock file beside
the file (:func:`nnssl.io.locked`), and nnU-Net's reads wait out a writer that is not ours.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as nnunet_trainer_module

from nnssl.errors import NnsslError
from nnssl.io import CONCURRENT_WRITE_WAIT_S, atomic_path, load_json, locked


def _save_json(obj: Any, file: str, indent: int = 4, sort_keys: bool = True) -> None:
    """``batchgenerators``' ``save_json`` (same arguments and output), atomic and locked."""
    with locked(file), atomic_path(file) as tmp:
        tmp.write_text(json.dumps(obj, sort_keys=sort_keys, indent=indent), encoding="utf-8")


def _load_json(file: str) -> Any:
    return load_json(file, wait_s=CONCURRENT_WRITE_WAIT_S)


def saved_model_plans(model_folder: str | Path) -> dict | None:
    """The plans.json that an earlier fold wrote into this model folder (None before the first fold starts);
    waits out a fold that is writing it, and names the file if it is damaged."""
    saved = Path(model_folder) / "plans.json"
    if not saved.is_file():
        return None
    try:
        plans = _load_json(saved)
        configurations = plans.get("configurations")
        if not isinstance(configurations, dict) or not all(isinstance(c, dict) for c in configurations.values()):
            raise ValueError("'configurations' is not a mapping of configurations")
    except (ValueError, AttributeError) as err:
        raise NnsslError(f"{saved} is damaged ({type(err).__name__}: {err}). Restore it from a backup, or copy "
                         f"the plans file from $nnUNet_preprocessed if no fold of this model was trained.") from None
    return plans


@contextmanager
def safe_shared_json() -> Iterator[None]:
    """While active, ``nnUNetTrainer``'s ``save_json``/``load_json`` are :func:`_save_json`/:func:`_load_json`.

    nnU-Net binds those names in its trainer module; replacing them there for the length of one trainer call
    changes nothing else (one training runs per process).
    """
    original = nnunet_trainer_module.save_json, nnunet_trainer_module.load_json
    nnunet_trainer_module.save_json, nnunet_trainer_module.load_json = _save_json, _load_json
    try:
        yield
    finally:
        nnunet_trainer_module.save_json, nnunet_trainer_module.load_json = original
