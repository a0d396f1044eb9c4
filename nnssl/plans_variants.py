"""Plans variants: one nnU-Net model folder per study run that one trainer class makes several times.

nnU-Net names a model folder ``<trainer>__<plans identifier>__<configuration>``, so one trainer fine-tuned twice
on a fold (two imported encoders with ``SwinUNETR_Imported_Trainer``) would write into one folder. nnU-Net's own
answer for experiments that differ in settings, not in data, is a plans file under another identifier whose
configuration keeps the ``data_identifier`` of the original (nnU-Net's documentation, "explanation_plans_files":
the preprocessed data are shared, nothing is preprocessed again). A variant written here is such a copy,
``<plans>_<name>.json``, with a record ``"nnssl_variant": {"of", "name", "knobs"}``: the trainer knobs
(``nnssl_*``, see nnssl_trainers/knobs.py) that make the run, which our trainers take as defaults (an
environment variable set by the user still wins). So ``nnUNetv2_train 3 3d_fullres 0 -tr
SwinUNETR_Imported_Trainer -p nnsslPlans_voco`` fine-tunes the VoCo encoder with nothing else set, and
``nnUNetv2_predict -p nnsslPlans_voco`` finds the model.

A seed repeat of a run (the study fine-tunes every many-shot fold once per seed of its ``seeds``) is a variant too:
``seed1`` with the knob ``nnssl_seed=1`` (``nnsslPlans_seed1``), or, of an imported encoder's run, ``voco_seed1``
with the encoder's knob kept (``nnsslPlans_voco_seed1``). Both are made of the study's plans, so ``"of"`` names the
plans the study compares on, and :func:`seed_repeat` maps a repeat back to the run it repeats.
"""
from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

from nnssl.errors import NnsslError
from nnssl.io import load_json, locked, save_json

VARIANT_KEY = "nnssl_variant"
# the trainers' section inside a configuration of the plans.json they save into the model folder (settings,
# provenance per fold); here, not in nnssl_trainers, so that the analysis reads it without importing torch
PLANS_KEY = "nnssl"
SEED_KNOB = "nnssl_seed"
_NAME = re.compile(r"^[A-Za-z0-9]+([_-][A-Za-z0-9]+)*$")  # never "__": nnU-Net's folder-name separator


def variant_identifier(plans_identifier: str, name: str) -> str:
    """``nnsslPlans`` + ``voco`` -> ``nnsslPlans_voco``."""
    if not _NAME.match(name):
        raise NnsslError(f"Plans variant name {name!r} must be letters and digits with single '_' or '-' between "
                         f"them (it becomes part of nnU-Net's plans identifier and model folder name), e.g. 'voco_b'.")
    return f"{plans_identifier}_{name}"


def seed_variant_name(name: str | None, seed: int) -> str:
    """The variant name of fine-tuning seed ``seed`` of a run on the plans (``seed1``) or on the variant ``name``
    (``voco_seed1``)."""
    return f"{name}_seed{seed}" if name else f"seed{seed}"


def seed_repeat(record: dict[str, Any]) -> tuple[str | None, int] | None:
    """(the variant repeated or None for the plans themselves, seed) when ``record`` is a seed repeat made by
    :func:`seed_variant_name` (``voco_seed1`` -> ``("voco", 1)``, ``seed1`` -> ``(None, 1)``), else None."""
    seed = record.get("knobs", {}).get(SEED_KNOB, "")
    if not seed.isdigit():
        return None
    name, repeat = record["name"], seed_variant_name(None, int(seed))
    if name == repeat:
        return None, int(seed)
    return (name[:-len(repeat) - 1], int(seed)) if name.endswith(f"_{repeat}") else None


def repeated_identifier(plans_identifier: str, repeat: str) -> str:
    """The plans identifier of the run that the seed repeat ``repeat`` (``seed1``, "" for none) of
    ``plans_identifier`` repeats: ``nnsslPlans_voco`` for ``nnsslPlans_voco_seed1``."""
    return plans_identifier.removesuffix(f"_{repeat}") if repeat else plans_identifier


def write_plans_variant(preprocessed_dataset: Path, plans_identifier: str, name: str,
                        knobs: dict[str, str]) -> Path:
    """``<preprocessed_dataset>/<plans_identifier>_<name>.json``: the plans ``plans_identifier`` under the new
    identifier with ``knobs`` recorded; rewritten only when it would change (other jobs may be reading it)."""
    from nnssl_trainers.knobs import KNOBS

    unknown = sorted(set(knobs) - set(KNOBS))
    if unknown:
        raise NnsslError(f"Plans variant {name!r}: {unknown} are not trainer knobs; known: {sorted(KNOBS)}.")
    source = preprocessed_dataset / f"{plans_identifier}.json"
    if not source.is_file():
        raise NnsslError(f"{source} does not exist, so the plans variant {name!r} cannot be made from it. Plan the "
                         f"dataset first: nnssl_align_plans -d {preprocessed_dataset.name} (for nnsslPlans) or "
                         f"nnUNetv2_plan_and_preprocess -d {preprocessed_dataset.name} -c 3d_fullres.")
    identifier = variant_identifier(plans_identifier, name)
    target = preprocessed_dataset / f"{identifier}.json"
    plans = copy.deepcopy(load_json(source))
    plans["plans_name"] = identifier  # data_identifier of every configuration stays: the data are shared
    plans[VARIANT_KEY] = {"of": plans_identifier, "name": name, "knobs": {k: str(v) for k, v in knobs.items()}}
    with locked(target):
        if not target.is_file() or load_json(target) != plans:
            save_json(plans, target)
    return target


def variant_record(plans: dict[str, Any]) -> dict[str, Any] | None:
    """The ``nnssl_variant`` record of a plans dict (as nnU-Net copies it into the model folder), or None."""
    return plans.get(VARIANT_KEY)


def apply_variant_knobs(plans: dict[str, Any]) -> dict[str, str]:
    """Set the variant's knobs in this process's environment where the user has not set them; returns those set
    (our trainers call this before they read any knob, so the knobs reach nnU-Net's augmentation workers too)."""
    record = variant_record(plans) or {}
    applied = {k: v for k, v in record.get("knobs", {}).items() if os.environ.get(k) in (None, "")}
    os.environ.update(applied)
    return applied
