"""Few-shot folds inside nnU-Net's cross-validation.

``splits_final.json`` keeps nnU-Net's five many-shot folds (0-4) untouched; few-shot folds are appended
after them. ``fewshot.json`` beside it records, for each added fold, the many-shot fold it was drawn
from, the number of training cases (shots), the seed and the foreground labels of the base fold's
training set that the fold's cases do not hold::

    {"version": 2, "folds": {"5": {"base_fold": 0, "shots": 1, "seed": 0, "uncovered_labels": [4]}, ...}}

Fold ids are assigned in creation order: for each shot count in the order given, for each base fold.
A few-shot fold trains on ``shots`` cases of its base fold's training set and validates on the base
fold's validation cases, so ``nnUNetv2_train DATASET 3d_fullres 7 -tr ...`` is a few-shot run that nnU-Net
evaluates exactly like the many-shot fold it came from. For one base fold and seed the case sets nest:
the 1-shot cases are among the 5-shot cases, which are among the 10-shot cases (the study compares
few-shot with many-shot fine-tuning of the same encoders, Jiang & Veeraraghavan 2026). Cases are chosen to
cover the labels (:mod:`nnssl.fewshot_selection`). Version 1 files (label-blind hash order) stay valid as
long as their folds are what version 2 draws; otherwise they are refused, never silently redrawn.
"""
from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from nnssl.errors import NnsslError
from nnssl.fewshot_selection import (CaseLabels, covering_order, preprocessed_data_folders, read_case_labels,
                                     uncovered_labels)
from nnssl.io import CONCURRENT_WRITE_WAIT_S, load_json, locked, save_json
from nnssl.paths import preprocessed_dataset

log = logging.getLogger(__name__)

FEWSHOT_FILENAME = "fewshot.json"
FEWSHOT_VERSION = 2  # 1: label-blind hash order; 2: label-covering order (nnssl.fewshot_selection)
SPLITS_FILENAME = "splits_final.json"
NUM_MANY_SHOT_FOLDS = 5
NNUNET_SPLIT_SEED = 12345  # nnUNetTrainer.do_split: generate_crossval_split(cases, seed=12345, n_splits=5)


def _one_writer_per_dataset(add):
    """Run ``add(dataset, ...)`` holding the lock of the dataset's ``splits_final.json``: two nnssl_fewshot (or
    study drivers) at once take turns, so the second reads the first's folds and numbers its own after them."""

    @functools.wraps(add)
    def add_locked(dataset: str | int, *args, **kwargs):
        folder = preprocessed_dataset(dataset)
        with locked(folder / SPLITS_FILENAME):
            return add(dataset, *args, **kwargs)

    return add_locked


def plan_fewshot_folds(shots: list[int], base_folds: list[int], seed: int,
                       existing: dict[str, dict] | None = None,
                       first_free_fold: int = NUM_MANY_SHOT_FOLDS) -> dict[str, dict]:
    """Fold id (as a string, JSON-style) -> ``{"base_fold", "shots", "seed"}`` for every requested fold.

    Folds already in ``existing`` keep their ids; new (base fold, shots, seed) combinations get the next
    free ids from ``first_free_fold`` (the number of folds already in ``splits_final.json``).
    """
    folds = dict(existing or {})
    known = {(v["base_fold"], v["shots"], v["seed"]): k for k, v in folds.items()}
    next_fold = max([first_free_fold - 1, *map(int, folds)]) + 1
    for n in shots:
        for base in base_folds:
            key = (base, n, seed)
            if key not in known:
                folds[str(next_fold)] = {"base_fold": base, "shots": n, "seed": seed}
                known[key] = str(next_fold)
                next_fold += 1
    return folds


def fewshot_cases(train_cases: Sequence[str], shots: int, base_fold: int, seed: int,
                  labels: CaseLabels) -> list[str]:
    """The ``shots`` training cases of a few-shot fold, sorted: the first ``shots`` of the label-covering
    order of ``train_cases`` (:func:`nnssl.fewshot_selection.covering_order`; ``labels``: case -> labels)."""
    return sorted(covering_order(train_cases, labels, base_fold, seed)[:shots])


@dataclass
class FewshotFold:
    """One few-shot fold of ``splits_final.json`` and whether this call added it."""

    fold: int
    base_fold: int
    shots: int
    seed: int
    num_train: int
    num_val: int
    added: bool
    uncovered_labels: list = field(default_factory=list)  # foreground labels of the base fold none of its cases hold


def load_fewshot(folder: Path) -> dict[str, dict]:
    """The ``folds`` table of ``folder/fewshot.json`` (fold id -> base_fold, shots, seed, ...); ``{}`` if absent."""
    return _load_fewshot_file(folder)[1]


def _load_fewshot_file(folder: Path) -> tuple[int, dict[str, dict]]:
    """(version, folds) of ``folder/fewshot.json``; ``(FEWSHOT_VERSION, {})`` if absent."""
    path = Path(folder) / FEWSHOT_FILENAME
    if not path.is_file():
        return FEWSHOT_VERSION, {}
    try:
        data = load_json(path, wait_s=CONCURRENT_WRITE_WAIT_S)
    except (OSError, json.JSONDecodeError) as err:
        raise NnsslError(f"{path} is damaged ({err}). Restore it from a backup, or delete it together with "
                         f"the few-shot folds it describes in {SPLITS_FILENAME}.") from None
    folds = data.get("folds") if isinstance(data, dict) else None
    valid = isinstance(folds, dict) and all(
        k.isdigit() and isinstance(v, dict) and all(isinstance(v.get(f), int) for f in ("base_fold", "shots", "seed"))
        for k, v in folds.items())
    if not valid:
        raise NnsslError(f"{path} is not a few-shot table: expected {{\"version\": 2, \"folds\": {{\"5\": "
                         f"{{\"base_fold\": 0, \"shots\": 1, \"seed\": 0}}, ...}}}}.")
    if data.get("version", 0) > FEWSHOT_VERSION:
        raise NnsslError(f"{path} was written by a newer nnssl (version {data['version']}); upgrade nnssl.")
    return int(data.get("version", 1)), folds


@_one_writer_per_dataset
def add_fewshot_folds(dataset: str | int, shots: Sequence[int], folds: Sequence[int] | None = None,
                      seed: int = 0) -> list[FewshotFold]:
    """Append few-shot folds to ``$nnUNet_preprocessed/<dataset>/splits_final.json``; returns the requested folds.

    Without a ``splits_final.json``, nnU-Net's default 5-fold split is written first, exactly as
    ``nnUNetTrainer.do_split`` would. For every shot count and base fold (default: the many-shot folds
    0-4) a fold is added unless ``fewshot.json`` already has it (idempotent); existing folds are never
    reordered or changed. ``fewshot.json`` is written before ``splits_final.json`` (both atomically), so an
    interrupted call is completed by the next one. Cases are chosen to cover the foreground labels of the
    base fold's training set (class locations of nnU-Net's preprocessed data); labels a fold's cases cannot
    all hold are recorded as its ``uncovered_labels`` and warned about.
    """
    folder = preprocessed_dataset(dataset)
    shots = list(dict.fromkeys(shots))  # repeated counts would add nothing
    bad = [n for n in shots if not isinstance(n, int) or n < 1]
    if not shots or bad:
        raise NnsslError(f"--shots needs positive whole numbers of training cases, e.g. --shots 1 5 10; got {bad or 'none'}.")
    if seed < 0:
        raise NnsslError(f"--seed must be 0 or positive; got {seed}.")
    splits_path = folder / SPLITS_FILENAME
    splits = load_splits(folder)
    version, recorded = _load_fewshot_file(folder)
    base_folds = _base_folds(folds, splits, recorded, splits_path)
    _check_shots(shots, base_folds, splits, folder.name)
    plan = {k: dict(v) for k, v in plan_fewshot_folds(shots, base_folds, seed, recorded, len(splits)).items()}
    drawn_from = sorted({v["base_fold"] for v in plan.values()})
    labels = read_case_labels(folder, sorted({c for b in drawn_from if b < len(splits) for c in splits[b]["train"]}))
    updated = _materialize(plan, splits, splits_path, labels, version)
    write_fold_files(folder, {"version": FEWSHOT_VERSION, "folds": plan},
                     updated if updated != splits or not splits_path.is_file() else None,
                     changed=plan != recorded or version != FEWSHOT_VERSION)
    wanted = {(b, n, seed) for n in shots for b in base_folds}
    requested = [FewshotFold(int(k), v["base_fold"], v["shots"], v["seed"], len(updated[int(k)]["train"]),
                             len(updated[int(k)]["val"]), added=int(k) >= len(splits),
                             uncovered_labels=list(v["uncovered_labels"]))
                 for k, v in sorted(plan.items(), key=lambda item: int(item[0]))
                 if (v["base_fold"], v["shots"], v["seed"]) in wanted]
    _warn_uncovered(requested, folder, splits, labels)
    return requested


def write_fold_files(folder: Path, fewshot: dict, splits: list[dict] | None, changed: bool) -> None:
    """The one place both files are written: ``fewshot.json`` (if ``changed``) before ``splits_final.json``
    (if given), each atomically, so an interrupted call is completed by the next one."""
    if changed:
        save_json(fewshot, folder / FEWSHOT_FILENAME)
    if splits is not None:
        save_json(splits, folder / SPLITS_FILENAME, indent=4)


def _warn_uncovered(folds: list[FewshotFold], folder: Path, splits: list[dict], labels: CaseLabels) -> None:
    names = _label_names(folder)
    for fold in folds:
        if not fold.uncovered_labels:
            continue
        train = splits[fold.base_fold]["train"]
        uncovered = [tuple(label) if isinstance(label, list) else label for label in fold.uncovered_labels]
        missing = ", ".join(f"{names.get(label, label)} (in {sum(label in labels[c] for c in train)} of "
                            f"{len(train)} cases)" for label in uncovered)
        log.warning("nnssl_fewshot: fold %d (%d-shot from fold %d) cannot hold every label of its base fold's "
                    "training set: its %d case(s), chosen to cover the most labels, do not hold %s. Its Dice for "
                    "these labels measures their absence, not pretraining (listed in %s).", fold.fold, fold.shots,
                    fold.base_fold, fold.shots, missing, FEWSHOT_FILENAME)


def _label_names(folder: Path) -> dict:
    """Label value -> name from the preprocessed ``dataset.json`` (regions: the tuple); {} if unreadable."""
    try:
        labels = load_json(folder / "dataset.json").get("labels", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return {(tuple(v) if isinstance(v, list) else v): name for name, v in labels.items()}


def load_splits(folder: Path) -> list[dict[str, list[str]]]:
    """``folder/splits_final.json``, or nnU-Net's default 5-fold split of the preprocessed cases when the file
    does not exist yet (what ``nnUNetv2_train`` would write; nothing is written here)."""
    path = Path(folder) / SPLITS_FILENAME
    return _load_splits(path) if path.is_file() else _default_splits(Path(folder))


def _load_splits(path: Path) -> list[dict[str, list[str]]]:
    try:
        splits = load_json(path, wait_s=CONCURRENT_WRITE_WAIT_S)  # nnU-Net may be writing it (do_split)
    except (OSError, json.JSONDecodeError) as err:
        raise NnsslError(f"{path} is damaged ({err}). Restore it, or delete it to have nnU-Net's default 5-fold "
                         f"split recreated (few-shot folds must then be added again).") from None
    if not isinstance(splits, list) or not all(isinstance(s, dict) and {"train", "val"} <= set(s) for s in splits):
        raise NnsslError(f"{path} is not an nnU-Net split file: expected a list of {{\"train\": [...], \"val\": [...]}}.")
    return splits


def _default_splits(folder: Path) -> list[dict[str, list[str]]]:
    """nnU-Net's own 5-fold split of the preprocessed cases (``nnUNetTrainer.do_split``)."""
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    cases = _case_identifiers(folder)
    if len(cases) < NUM_MANY_SHOT_FOLDS:
        raise NnsslError(f"{folder.name} has {len(cases)} preprocessed cases; nnU-Net's 5-fold cross-validation "
                         f"needs at least {NUM_MANY_SHOT_FOLDS}.")
    splits = generate_crossval_split(sorted(cases), seed=NNUNET_SPLIT_SEED, n_splits=NUM_MANY_SHOT_FOLDS)
    return [{"train": [str(c) for c in s["train"]], "val": [str(c) for c in s["val"]]} for s in splits]


def _case_identifiers(folder: Path) -> list[str]:
    """Case ids of the preprocessed data folders the dataset's plans name (all must agree)."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    data_folders = preprocessed_data_folders(folder)
    found: dict[Path, list[str]] = {}
    for data in sorted(data_folders):
        try:
            found[data] = sorted(infer_dataset_class(str(data)).get_identifiers(str(data)))
        except (AssertionError, KeyError):
            continue  # empty or mixed folder: not usable data
    if not found:
        raise NnsslError(f"No preprocessed cases in {folder}, so nnU-Net's default split cannot be made. Run "
                         f"nnUNetv2_plan_and_preprocess -d {folder.name} first.")
    if len({tuple(v) for v in found.values()}) > 1:
        sizes = {p.name: len(v) for p, v in found.items()}
        raise NnsslError(f"The preprocessed configurations of {folder.name} hold different cases ({sizes}). "
                         f"Re-run nnUNetv2_preprocess so they agree, then run nnssl_fewshot again.")
    return next(iter(found.values()))


def _base_folds(folds: Sequence[int] | None, splits: list[dict], recorded: dict[str, dict],
                splits_path: Path) -> list[int]:
    many_shot = [i for i in range(len(splits)) if str(i) not in recorded]
    if folds is None:
        return [i for i in many_shot if i < NUM_MANY_SHOT_FOLDS]
    folds = list(dict.fromkeys(folds))
    for fold in folds:
        if str(fold) in recorded:
            raise NnsslError(f"--folds {fold}: fold {fold} is itself a few-shot fold (see {FEWSHOT_FILENAME}); "
                             f"few-shot folds are drawn from the many-shot folds {many_shot}.")
        if fold not in many_shot:
            raise NnsslError(f"--folds {fold}: {splits_path} has folds 0-{len(splits) - 1}; choose base folds "
                             f"among the many-shot folds {many_shot}.")
    return folds


def _check_shots(shots: list[int], base_folds: list[int], splits: list[dict], dataset: str) -> None:
    for n in shots:
        small = {b: len(splits[b]["train"]) for b in base_folds if len(splits[b]["train"]) < n}
        if small:
            fewest = min(len(splits[b]["train"]) for b in base_folds)
            raise NnsslError(
                f"--shots {n} is more than the training set of fold(s) {sorted(small)} of {dataset} "
                f"({', '.join(f'fold {b}: {c} cases' for b, c in small.items())}). Use at most {fewest} shots.")


def _materialize(plan: dict[str, dict], splits: list[dict], splits_path: Path, labels: CaseLabels,
                 version: int) -> list[dict]:
    """``splits`` with every planned fold present: existing ones checked, missing ones appended in id order.
    Each entry of ``plan`` gets its ``uncovered_labels``. ``version``: of the ``fewshot.json`` read."""
    updated = list(splits)
    for key in sorted(plan, key=int):
        entry, fold = plan[key], int(key)
        if not 0 <= entry["base_fold"] < min(len(splits), fold):
            raise NnsslError(f"{FEWSHOT_FILENAME} says fold {fold} is drawn from fold {entry['base_fold']}, which "
                             f"{splits_path} does not have. Restore both files from a backup.")
        base = splits[entry["base_fold"]]
        train = fewshot_cases(base["train"], entry["shots"], entry["base_fold"], entry["seed"], labels)
        expected = {"train": train, "val": list(base["val"])}
        entry["uncovered_labels"] = [list(label) if isinstance(label, tuple) else label  # as JSON reads it back
                                     for label in uncovered_labels(train, base["train"], labels)]
        if fold < len(updated):
            if updated[fold] != expected and version < FEWSHOT_VERSION:
                raise NnsslError(
                    f"Fold {fold} of {splits_path} was drawn by an older nnssl ({FEWSHOT_FILENAME} version "
                    f"{version}: cases in hash order, blind to labels); this nnssl draws few-shot folds that cover "
                    f"the labels (version {FEWSHOT_VERSION}) and would choose other cases, so it changes nothing. "
                    f"Keep using the old folds with the nnssl that made them, or redraw them: delete "
                    f"{FEWSHOT_FILENAME}, keep only the first {NUM_MANY_SHOT_FOLDS} folds of {SPLITS_FILENAME}, "
                    f"run nnssl_fewshot again and retrain the few-shot models.")
            if updated[fold] != expected:
                raise NnsslError(
                    f"Fold {fold} of {splits_path} is not the {entry['shots']}-shot fold of base fold "
                    f"{entry['base_fold']} (seed {entry['seed']}) that {FEWSHOT_FILENAME} records: one of the two "
                    f"files was edited. Restore both, or remove the few-shot folds and {FEWSHOT_FILENAME} and run "
                    f"nnssl_fewshot again.")
        elif fold == len(updated):
            updated.append(expected)
        else:
            raise NnsslError(f"{FEWSHOT_FILENAME} records fold {fold} but {splits_path} has only {len(updated)} "
                             f"folds; the files do not belong together. Restore both from a backup.")
    return updated
