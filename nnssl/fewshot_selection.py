"""Which training cases a few-shot fold takes: label-covering, seeded, nested.

A 1-shot fold of a 15-organ task drawn blind to labels can miss an organ entirely; its Dice for that organ
is then 0 or undefined for reasons that have nothing to do with pretraining. So cases are ordered greedily:
each next case is the one that adds the most foreground labels not yet covered (ties: the one whose new
labels are rarest in the base fold's training set, then the seeded SHA-256 rank of the case name). A
k-shot fold takes the first k cases of that order, so for one base fold and seed the folds nest
(1-shot inside 5-shot inside 10-shot), and the order never depends on library versions or on the order
of the case list. Once every label is covered the order is the plain hash rank.

Which labels a case holds is read from what nnU-Net already stores: ``class_locations`` in each
preprocessed case's ``.pkl`` (foreground voxels sampled per label; an empty list means the label is absent).
"""
from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path
from typing import Mapping, Sequence

from nnssl.errors import NnsslError
from nnssl.io import load_json

Label = int | tuple[int, ...]  # a label, or a region (a tuple of labels) in region-based datasets
CaseLabels = Mapping[str, frozenset[Label]]


def hash_order(cases: Sequence[str], base_fold: int, seed: int) -> list[str]:
    """``cases`` ranked by SHA-256 of ``"<seed>:<base_fold>:<case>"`` (the label-blind order of version 1)."""
    return sorted(cases, key=lambda case: hashlib.sha256(f"{seed}:{base_fold}:{case}".encode()).hexdigest())


def covering_order(cases: Sequence[str], labels: CaseLabels, base_fold: int, seed: int) -> list[str]:
    """Every case of ``cases``, greedily ordered to cover the foreground labels (see the module docstring)."""
    remaining = hash_order(cases, base_fold, seed)
    frequency: dict[Label, int] = {}
    for case in remaining:
        for label in labels[case]:
            frequency[label] = frequency.get(label, 0) + 1
    covered: set[Label] = set()
    order = []
    while remaining:
        def gain(case: str) -> tuple[int, float]:
            new = labels[case] - covered
            return len(new), sum(1 / frequency[label] for label in new)

        best = max(remaining, key=gain)  # max keeps the first (best hash rank) of equal gains
        remaining.remove(best)
        order.append(best)
        covered |= labels[best]
    return order


def uncovered_labels(chosen: Sequence[str], all_cases: Sequence[str], labels: CaseLabels) -> list[Label]:
    """Foreground labels present in ``all_cases`` but in none of ``chosen``, sorted."""
    present = set().union(*(labels[c] for c in all_cases))
    return sorted(present - set().union(*(labels[c] for c in chosen)), key=str)


def read_case_labels(dataset_folder: Path, cases: Sequence[str]) -> dict[str, frozenset[Label]]:
    """Case -> foreground labels present, from ``class_locations`` of nnU-Net's preprocessed ``<case>.pkl``.

    Looks in the data folders the dataset's plans files name (``nnUNetPlans_3d_fullres``, ...) and takes
    the first one that holds every case.
    """
    folders = preprocessed_data_folders(dataset_folder)
    for folder in folders:
        if all((folder / f"{case}.pkl").is_file() for case in cases):
            return {case: _labels_of(folder / f"{case}.pkl") for case in cases}
    looked = ", ".join(str(f) for f in folders) or f"no data folder named by a plans file in {dataset_folder}"
    raise NnsslError(f"Few-shot folds cover the labels of the training cases, which nnU-Net stores with the "
                     f"preprocessed data; no preprocessed folder holds all {len(cases)} training cases of "
                     f"{dataset_folder.name} (looked in: {looked}). Run: nnUNetv2_plan_and_preprocess -d "
                     f"{dataset_folder.name} -c 3d_fullres")


def preprocessed_data_folders(dataset_folder: Path) -> list[Path]:
    """The existing data folders (``data_identifier``) of every configuration of every plans file, sorted."""
    found = set()
    for plans_file in sorted(dataset_folder.glob("*.json")):
        try:
            plans = load_json(plans_file)
        except (OSError, json.JSONDecodeError):
            continue  # not every json there is a plans file; damaged plans are nnU-Net's to report
        configurations = plans.get("configurations", {}) if isinstance(plans, dict) else {}
        for configuration in configurations.values():
            identifier = configuration.get("data_identifier") if isinstance(configuration, dict) else None
            if identifier and (dataset_folder / identifier).is_dir():
                found.add(dataset_folder / identifier)
    return sorted(found)


def _labels_of(pkl: Path) -> frozenset[Label]:
    try:
        with open(pkl, "rb") as f:
            locations = pickle.load(f)["class_locations"]
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError) as err:
        raise NnsslError(f"{pkl} has no readable class_locations ({type(err).__name__}: {err}); re-run "
                         f"nnUNetv2_preprocess for this dataset.") from None
    labels: set[Label] = set()
    for key, voxels in locations.items():
        # region-based datasets key regions by tuples of labels; the ignore-label entry holds -1 and background
        label = tuple(int(m) for m in key) if isinstance(key, (tuple, list)) else int(key)
        if len(voxels) and (label > 0 if isinstance(label, int) else min(label) > 0):
            labels.add(label)
    return frozenset(labels)
