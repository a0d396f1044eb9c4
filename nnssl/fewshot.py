"""Few-shot folds inside nnU-Net's cross-validation.

``splits_final.json`` keeps nnU-Net's five many-shot folds (0-4) untouched; few-shot folds are appended
after them. ``fewshot.json`` beside it records, for each added fold, the many-shot fold it was drawn
from, the number of training cases (shots) and the seed::

    {"version": 1, "folds": {"5": {"base_fold": 0, "shots": 1, "seed": 0}, ...}}

Fold ids are assigned in creation order: for each shot count in the order given, for each base fold.
A few-shot fold trains on ``shots`` cases of its base fold's training set and validates on the base
fold's validation cases, so ``nnUNetv2_train DATASET 3d_fullres 7 -tr ...`` is a few-shot run that nnU-Net
evaluates exactly like the many-shot fold it came from. For one base fold and seed the case sets nest:
the 1-shot cases are among the 5-shot cases, which are among the 10-shot cases (the study compares
few-shot with many-shot fine-tuning of the same encoders, Jiang & Veeraraghavan 2026).
"""
from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from nnssl.errors import NnsslError
from nnssl.io import CONCURRENT_WRITE_WAIT_S, load_json, locked, save_json
from nnssl.paths import dataset_folder, nnunet_preprocessed

FEWSHOT_FILENAME = "fewshot.json"
FEWSHOT_VERSION = 1
SPLITS_FILENAME = "splits_final.json"
NUM_MANY_SHOT_FOLDS = 5
NNUNET_SPLIT_SEED = 12345  # nnUNetTrainer.do_split: generate_crossval_split(cases, seed=12345, n_splits=5)


def _one_writer_per_dataset(add):
    """Run ``add(dataset, ...)`` holding the lock of the dataset's ``splits_final.json``: two nnssl_fewshot (or
    study drivers) at once take turns, so the second reads the first's folds and numbers its own after them."""

    @functools.wraps(add)
    def add_locked(dataset: str | int, *args, **kwargs):
        folder = dataset_folder(nnunet_preprocessed(), dataset, "nnUNet_preprocessed")
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


def fewshot_cases(train_cases: Sequence[str], shots: int, base_fold: int, seed: int) -> list[str]:
    """The ``shots`` training cases of a few-shot fold, sorted.

    Cases are ranked by SHA-256 of ``"<seed>:<base_fold>:<case>"`` and the first ``shots`` are taken, so
    for one base fold and seed a smaller set is always inside a larger one, and the choice never depends
    on library versions or on the order of ``train_cases``.
    """
    ranked = sorted(train_cases, key=lambda case: hashlib.sha256(f"{seed}:{base_fold}:{case}".encode()).hexdigest())
    return sorted(ranked[:shots])


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


def load_fewshot(folder: Path) -> dict[str, dict]:
    """The ``folds`` table of ``folder/fewshot.json`` (fold id -> base_fold, shots, seed); ``{}`` if absent."""
    path = Path(folder) / FEWSHOT_FILENAME
    if not path.is_file():
        return {}
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
        raise NnsslError(f"{path} is not a few-shot table: expected {{\"version\": 1, \"folds\": {{\"5\": "
                         f"{{\"base_fold\": 0, \"shots\": 1, \"seed\": 0}}, ...}}}}.")
    if data.get("version", 0) > FEWSHOT_VERSION:
        raise NnsslError(f"{path} was written by a newer nnssl (version {data['version']}); upgrade nnssl.")
    return folds


@_one_writer_per_dataset
def add_fewshot_folds(dataset: str | int, shots: Sequence[int], folds: Sequence[int] | None = None,
                      seed: int = 0) -> list[FewshotFold]:
    """Append few-shot folds to ``$nnUNet_preprocessed/<dataset>/splits_final.json``; returns the requested folds.

    Without a ``splits_final.json``, nnU-Net's default 5-fold split is written first, exactly as
    ``nnUNetTrainer.do_split`` would. For every shot count and base fold (default: the many-shot folds
    0-4) a fold is added unless ``fewshot.json`` already has it (idempotent); existing folds are never
    reordered or changed. ``fewshot.json`` is written before ``splits_final.json`` (both atomically), so an
    interrupted call is completed by the next one.
    """
    folder = dataset_folder(nnunet_preprocessed(), dataset, "nnUNet_preprocessed")
    shots = list(dict.fromkeys(shots))  # repeated counts would add nothing
    bad = [n for n in shots if not isinstance(n, int) or n < 1]
    if not shots or bad:
        raise NnsslError(f"--shots needs positive whole numbers of training cases, e.g. --shots 1 5 10; got {bad or 'none'}.")
    if seed < 0:
        raise NnsslError(f"--seed must be 0 or positive; got {seed}.")
    splits_path = folder / SPLITS_FILENAME
    splits = load_splits(folder)
    recorded = load_fewshot(folder)
    base_folds = _base_folds(folds, splits, recorded, splits_path)
    _check_shots(shots, base_folds, splits, folder.name)
    plan = plan_fewshot_folds(shots, base_folds, seed, recorded, first_free_fold=len(splits))
    updated = _materialize(plan, splits, splits_path)
    if plan != recorded:
        save_json({"version": FEWSHOT_VERSION, "folds": plan}, folder / FEWSHOT_FILENAME)
    if updated != splits or not splits_path.is_file():
        save_json(updated, splits_path, indent=4)
    wanted = {(b, n, seed) for n in shots for b in base_folds}
    return [FewshotFold(int(k), v["base_fold"], v["shots"], v["seed"], len(updated[int(k)]["train"]),
                        len(updated[int(k)]["val"]), added=int(k) >= len(splits))
            for k, v in sorted(plan.items(), key=lambda item: int(item[0]))
            if (v["base_fold"], v["shots"], v["seed"]) in wanted]


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

    data_folders = set()
    for plans_file in sorted(folder.glob("*.json")):
        try:
            plans = load_json(plans_file)
        except (OSError, json.JSONDecodeError):
            continue  # not every json there is a plans file; damaged plans are nnU-Net's to report
        configurations = plans.get("configurations", {}) if isinstance(plans, dict) else {}
        for configuration in configurations.values():
            identifier = configuration.get("data_identifier") if isinstance(configuration, dict) else None
            if identifier and (folder / identifier).is_dir():
                data_folders.add(folder / identifier)
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


def _materialize(plan: dict[str, dict], splits: list[dict], splits_path: Path) -> list[dict]:
    """``splits`` with every planned fold present: existing ones checked, missing ones appended in id order."""
    updated = list(splits)
    for key in sorted(plan, key=int):
        entry, fold = plan[key], int(key)
        if not 0 <= entry["base_fold"] < min(len(splits), fold):
            raise NnsslError(f"{FEWSHOT_FILENAME} says fold {fold} is drawn from fold {entry['base_fold']}, which "
                             f"{splits_path} does not have. Restore both files from a backup.")
        base = splits[entry["base_fold"]]
        expected = {"train": fewshot_cases(base["train"], entry["shots"], entry["base_fold"], entry["seed"]),
                    "val": list(base["val"])}
        if fold < len(updated):
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
