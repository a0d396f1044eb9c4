"""The fine-tuning runs ``nnssl_report`` reads: every nnssl SwinUNETR trainer x fold under ``$nnUNet_results``.

A fold is ``finished`` (``checkpoint_final.pth`` and ``validation/summary.json``: its Dice per case and nnU-Net's
training log are read), ``unfinished``, ``not validated``, or ``missing`` (a method x fold another method of the
task has). Each run that is not finished says which command finishes it.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from nnssl.analysis.references import BASELINE
from nnssl.analysis.results import (IMPORTED_FAMILY, UNKNOWN, ModelFolder, case_id, dataset_modality, folder_method,
                                    load_fewshot, method_family, nnssl_trainer_classes, parse_model_folder,
                                    shot_setting)
from nnssl.errors import NnsslError
from nnssl.io import load_json
from nnssl.paths import dataset_folder, nnunet_preprocessed, nnunet_results
from nnssl.plans_variants import repeated_identifier, variant_identifier

log = logging.getLogger(__name__)

FINISHED, UNFINISHED, NOT_VALIDATED, MISSING = "finished", "unfinished", "not validated", "missing"


@dataclass
class FoldRun:
    """One trainer x fold of one task, as found on disk."""

    task: str
    dataset: str
    modality: str
    trainer: str
    plans: str
    configuration: str
    method: str
    family: str
    fold: str
    shot: str
    status: str
    seed_repeat: str = ""  # "seed<s>": a many-shot fold fine-tuned again with seed s (a seed variant's folder)
    detail: str = ""
    case_dice: list[float] = field(default_factory=list)
    case_ids: list[str] = field(default_factory=list)  # the cases of case_dice, in the same order
    logging: dict[str, list] = field(default_factory=dict)  # nnU-Net logging lists (ema_fg_dice, val_losses, ...)


def dice_by_case(summary: dict) -> dict[str, float]:
    """Case identifier -> mean Dice over the foreground labels/regions with a defined Dice, per case of
    nnU-Net's ``summary.json`` (cases where no label has one are left out)."""
    values = {}
    for case in summary["metric_per_case"]:
        dice = [m["Dice"] for m in case["metrics"].values() if m.get("Dice") is not None and not math.isnan(m["Dice"])]
        if dice:
            values[case_id(case["reference_file"])] = float(np.mean(dice))
    return values


def _read_fold(folder: ModelFolder, fold: str, base: dict[str, str], notes: list[str]) -> FoldRun:
    fold_dir = folder.path / f"fold_{fold}"
    run = FoldRun(fold=fold, status=FINISHED, **base)
    final = fold_dir / "checkpoint_final.pth"
    retrain = f"nnUNetv2_train {folder.dataset} {folder.configuration} {fold} -tr {folder.trainer} -p {folder.plans}"
    if not final.is_file():
        latest = fold_dir / "checkpoint_latest.pth"
        progress = ""
        if latest.is_file():
            state = _training_state(latest, notes)
            progress = (f" (checkpoint_latest.pth after epoch {state['current_epoch']})" if state
                        else " (checkpoint_latest.pth cannot be read: delete it first)")
        run.status, run.detail = UNFINISHED, f"no checkpoint_final.pth{progress}; continue with: {retrain} --c"
        return run
    summary = fold_dir / "validation" / "summary.json"
    if not summary.is_file():
        run.status, run.detail = NOT_VALIDATED, f"no validation/summary.json; validate with: {retrain} --val"
        return run
    by_case = dice_by_case(load_json(summary))
    run.case_ids, run.case_dice = list(by_case), list(by_case.values())
    run.logging = (_training_state(final, notes) or {}).get("logging") or {}
    return run


def _training_state(checkpoint: Path, notes: list[str]) -> dict | None:
    """nnU-Net's checkpoint dict (``current_epoch``, ``logging``, ...), or None with a note naming the file when it
    is none: truncated by a kill or a full disk, or a foreign file under nnU-Net's name."""
    try:
        # mmap: only the small logging lists are read, not the network weights
        state = torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # torch raises many types for truncated or non-zip files
        problem = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
    else:
        if isinstance(state, dict) and "current_epoch" in state:
            return state
        problem = "no nnU-Net training state (current_epoch) in it"
    note = (f"{checkpoint} is not a readable nnU-Net checkpoint ({problem}); skipped: its training log is not "
            f"reported. A truncated checkpoint is best deleted; nnUNetv2_train ... --c then continues from the "
            f"fold's other checkpoints.")
    log.warning("%s", note)
    notes.append(note)
    return None


def collect_runs(datasets: Sequence[str] | None = None,
                 baselines: Mapping[str, str] | None = None) -> tuple[list[FoldRun], list[str]]:
    """Every nnssl SwinUNETR trainer x fold under ``$nnUNet_results`` (only ``datasets`` if given), and
    notes on what was skipped. ``baselines``: model folder name (``nnUNetTrainer__nnUNetPlans__3d_fullres``)
    -> row name of the reference trainers to read too (family ``baseline``)."""
    root = nnunet_results()
    if not root.is_dir():
        raise NnsslError(f"$nnUNet_results ({root}) does not exist; train models with nnUNetv2_train first.")
    dataset_dirs = ([dataset_folder(root, d, "nnUNet_results") for d in datasets] if datasets
                    else sorted(p for p in root.glob("Dataset*") if p.is_dir()))
    ours = nnssl_trainer_classes()
    baselines = baselines or {}
    runs, notes = [], []
    for dataset_dir in dataset_dirs:
        folders = [parse_model_folder(p) for p in sorted(dataset_dir.iterdir())
                   if p.is_dir() and p.name.count("__") == 2]
        # a baseline's seed repeats are its rows too
        references = [f for f in folders if _repeated_name(f) in baselines]
        folders = [f for f in folders if f not in references and (f.trainer in ours or f.nnssl_settings() is not None)]
        if not folders:
            notes.append(f"{dataset_dir.name}: no nnssl SwinUNETR model folders")
            continue
        several = len({(f.study_plans, f.configuration) for f in folders}) > 1
        fewshot = _fewshot_of(dataset_dir.name, notes)
        for folder in folders + references:
            if not (folder.path / "dataset.json").is_file():
                notes.append(f"{folder.path}: no dataset.json (not written by nnUNetv2_train?); skipped")
                continue
            if folder in references:
                method, family = baselines[_repeated_name(folder)], BASELINE
            else:
                method = folder_method(folder, ours)
                family = IMPORTED_FAMILY if folder.method_variant else method_family(method)
            base = {"task": f"{folder.dataset} [{folder.study_plans}/{folder.configuration}]" if several
                    else folder.dataset,
                    "dataset": folder.dataset, "modality": dataset_modality(load_json(folder.path / "dataset.json")),
                    "trainer": folder.trainer, "plans": folder.plans, "configuration": folder.configuration,
                    "method": method, "family": family, "seed_repeat": folder.seed_repeat}
            for fold in folder.folds:
                runs.append(_read_fold(folder, fold, {**base, "shot": shot_setting(fold, fewshot)}, notes))
    if not runs:
        raise NnsslError(f"No nnssl SwinUNETR trainings found in $nnUNet_results ({root})"
                         f"{' for ' + ', '.join(map(str, datasets)) if datasets else ''}. Train one with: "
                         f"nnUNetv2_train DATASET 3d_fullres FOLD -tr SwinUNETR_Scratch_Trainer")
    return runs, notes


def _repeated_name(folder: ModelFolder) -> str:
    """The model folder name of the run ``folder`` repeats with another seed (its own name if it is no repeat)."""
    return f"{folder.trainer}__{folder.repeated_plans}__{folder.configuration}"


def _fewshot_of(dataset: str, notes: list[str]) -> dict[str, dict]:
    try:
        preprocessed = nnunet_preprocessed() / dataset
    except NnsslError:
        notes.append(f"{dataset}: $nnUNet_preprocessed is not set, so fewshot.json cannot be read; folds above 4 "
                     f"are reported with shot setting '{UNKNOWN}'")
        return {}
    return load_fewshot(preprocessed)


def missing_runs(runs: list[FoldRun]) -> list[FoldRun]:
    """Placeholders for every (task, method, fold, seed repeat) that another method of the task has but this one
    lacks; methods are those found in any task."""
    methods = {r.method: r for r in runs if not r.seed_repeat}
    methods.update({r.method: r for r in runs if r.method not in methods})  # only seed repeats found
    missing = []
    for task in dict.fromkeys(r.task for r in runs):
        in_task = [r for r in runs if r.task == task]
        folds = {(r.fold, r.seed_repeat): r.shot for r in in_task}
        present = {(r.method, r.fold, r.seed_repeat) for r in in_task}
        for method, (fold, repeat) in ((m, f) for m in methods for f in folds):
            if (method, fold, repeat) not in present:
                example = next((r for r in in_task if r.family not in (BASELINE, IMPORTED_FAMILY)), in_task[0])
                # a baseline and an imported encoder keep their own plans; other methods share the task's
                origin = methods[method] if methods[method].family in (BASELINE, IMPORTED_FAMILY) else example
                trainer = methods[method].trainer
                plans = repeated_identifier(origin.plans, origin.seed_repeat)
                plans = variant_identifier(plans, repeat) if repeat else plans
                missing.append(FoldRun(task=task, dataset=example.dataset, modality=example.modality, trainer=trainer,
                                       plans=plans, configuration=origin.configuration, method=method,
                                       family=methods[method].family, fold=fold, shot=folds[(fold, repeat)],
                                       status=MISSING, seed_repeat=repeat,
                                       detail=f"train with: nnUNetv2_train {example.dataset} {origin.configuration} "
                                              f"{fold} -tr {trainer} -p {plans}"))
    return missing
