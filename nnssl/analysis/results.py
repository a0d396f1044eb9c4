"""What a trained nnU-Net model folder says about itself: trainer, SSL method and family, modality, shots.

A model folder is ``$nnUNet_results/DatasetXXX_Name/<Trainer>__<plans>__<configuration>/`` with
``plans.json``, ``dataset.json`` and ``fold_K/`` subfolders, as ``nnUNetv2_train`` writes it. Our
trainers add ``configurations[<configuration>]["nnssl"]`` to the saved plans (backbone, epochs, and the
pretrained encoder it started from).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from nnssl.errors import NnsslError
from nnssl.fewshot import FEWSHOT_FILENAME, NUM_MANY_SHOT_FOLDS
from nnssl.io import load_json
from nnssl.plans_variants import PLANS_KEY, repeated_identifier, seed_repeat, seed_variant_name, variant_record

SCRATCH = "scratch"  # method name of a SwinUNETR trained from random initialisation
UNKNOWN = "unknown"
IMPORTED_FAMILY = "imported"  # encoders the study did not pretrain (plans variants of SwinUNETR_Imported_Trainer)
MANY_SHOT = "many-shot"


@dataclass(frozen=True)
class ModelFolder:
    """``<Trainer>__<plans>__<configuration>`` parsed, with the dataset folder it sits in."""

    path: Path
    trainer: str
    plans: str
    configuration: str

    @property
    def dataset(self) -> str:
        return self.path.parent.name

    @property
    def folds(self) -> list[str]:
        """Fold names present (``"0"``, ``"5"``, ``"all"``), numeric ones in numeric order."""
        names = [p.name[len("fold_"):] for p in self.path.glob("fold_*") if p.is_dir()]
        return sorted(names, key=lambda f: (not f.isdigit(), int(f) if f.isdigit() else 0, f))

    def nnssl_settings(self) -> dict | None:
        """The trainers' ``nnssl`` section of the saved plans, or None (not an nnssl SwinUNETR folder)."""
        return self._plans.get("configurations", {}).get(self.configuration, {}).get(PLANS_KEY)

    def variant(self) -> dict | None:
        """The ``nnssl_variant`` record when the folder was trained on a plans variant (nnssl.plans_variants)."""
        return variant_record(self._plans)

    @property
    def method_variant(self) -> str | None:
        """The variant that names the folder's method (an imported encoder's, also in its seed repeats), or None."""
        variant = self.variant()
        if variant is None:
            return None
        repeat = seed_repeat(variant)
        return repeat[0] if repeat else variant["name"]

    @property
    def seed_repeat(self) -> str:
        """``seed<s>`` when the folder repeats a run with another fine-tuning seed (a seed variant), else ``""``."""
        variant = self.variant()
        repeat = seed_repeat(variant) if variant else None
        return seed_variant_name(None, repeat[1]) if repeat else ""

    @property
    def repeated_plans(self) -> str:
        """The plans of the run a seed repeat repeats (``nnsslPlans`` for ``nnsslPlans_seed1``), else its own."""
        return repeated_identifier(self.plans, self.seed_repeat)

    @property
    def study_plans(self) -> str:
        """The plans the study compares on: a variant's source (``nnsslPlans`` for ``nnsslPlans_voco``)."""
        variant = self.variant()
        return variant["of"] if variant else self.plans

    @cached_property
    def _plans(self) -> dict:
        # read once: the settings, the variant and the seed repeat all come from it (folders of finished runs)
        plans_file = self.path / "plans.json"
        return load_json(plans_file) if plans_file.is_file() else {}


def parse_model_folder(path: Path) -> ModelFolder:
    parts = path.name.split("__")
    if len(parts) != 3 or not all(parts):
        raise NnsslError(f"{path} is not an nnU-Net trained-model folder: its name should be "
                         f"<Trainer>__<plans>__<configuration>, e.g. SwinUNETR_SMIT_Trainer__nnUNetPlans__3d_fullres.")
    return ModelFolder(path, *parts)


def nnssl_trainer_classes() -> dict[str, type]:
    """Our SwinUNETR trainers (the scratch trainer and every subclass, however deep), by class name."""
    from nnssl_trainers.swinunetr import SwinUNETR_Scratch_Trainer

    found, todo = {}, [SwinUNETR_Scratch_Trainer]
    while todo:
        cls = todo.pop()
        found[cls.__name__] = cls
        todo.extend(cls.__subclasses__())
    return found


def trainer_method(trainer_class: type) -> str:
    """The SSL method a trainer fine-tunes from (its ``pretrain_method``), or ``"scratch"``."""
    return getattr(trainer_class, "pretrain_method", None) or SCRATCH


def folder_method(folder: ModelFolder, trainers: dict[str, type]) -> str:
    """The method a model folder fine-tuned: a plans variant's name (an imported encoder in the study; a seed repeat
    is its run's method), else its trainer's method, else the pretrained record's (a trainer class that is not
    importable here)."""
    if folder.method_variant:
        return folder.method_variant
    if folder.trainer in trainers:
        return trainer_method(trainers[folder.trainer])
    return ((folder.nnssl_settings() or {}).get("pretrained") or {}).get("method", SCRATCH)


def method_family(method: str) -> str:
    """Pretext family of ``method`` from the method registry ("contrastive", "rotation", "mim",
    "self-distillation"); ``"scratch"`` for no pretraining, ``"unknown"`` for an unregistered method."""
    if method == SCRATCH:
        return SCRATCH
    from nnssl.methods.registry import get_method

    try:
        return get_method(method).family
    except NnsslError:
        return UNKNOWN


def dataset_modality(dataset_json: dict) -> str:
    """``"CT"`` or ``"MRI"``: ``imaging_modality`` when nnssl wrote the dataset, else CT if a channel is
    named CT (nnU-Net's convention that switches on CT normalisation), else MRI."""
    modality = str(dataset_json.get("imaging_modality", "")).upper()
    if modality in ("CT", "MRI"):
        return modality
    channels = dataset_json.get("channel_names") or dataset_json.get("modality") or {}
    return "CT" if any(str(name).strip().upper() == "CT" for name in channels.values()) else "MRI"


def load_fewshot(preprocessed_dataset: Path) -> dict[str, dict]:
    """Fold id -> ``{"base_fold", "shots", "seed"}`` from the dataset's ``fewshot.json`` ({} if absent)."""
    path = preprocessed_dataset / FEWSHOT_FILENAME
    if not path.is_file():
        return {}
    try:
        return dict(load_json(path)["folds"])
    except (ValueError, KeyError, TypeError) as err:
        raise NnsslError(f"{path} is damaged ({type(err).__name__}: {err}); expected "
                         f'{{"version": 1, "folds": {{"5": {{"base_fold": 0, "shots": 1, "seed": 0}}}}}}. '
                         f"Re-create it with nnssl_fewshot.") from None


def shot_setting(fold: str, fewshot: dict[str, dict]) -> str:
    """``"many-shot"`` for nnU-Net's folds 0-4 and ``all``, ``"<k>-shot"`` for a fold in ``fewshot.json``,
    ``"unknown"`` for any other fold."""
    if fold in fewshot:
        return f"{int(fewshot[fold]['shots'])}-shot"
    if fold == "all" or (fold.isdigit() and int(fold) < NUM_MANY_SHOT_FOLDS):
        return MANY_SHOT
    return UNKNOWN


def case_id(path: str) -> str:
    """The nnU-Net case identifier of a file of ``summary.json`` (its name without the file ending)."""
    return Path(path).name.split(".")[0]
