"""Pretraining data: random regions of nnU-Net-preprocessed volumes, read lazily, turned into method views.

Volumes stay compressed on disk (nnU-Net's blosc2 ``.b2nd`` files, memory-mapped); a sample reads only the
chunks under its region. Samples are produced in DataLoader worker processes, each with its own seeded
random stream (seed, rank, worker), and every rank draws from its own shard of the volumes.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from nnssl.data.views import ViewMaker
from nnssl.errors import NnsslError
from nnssl.io import load_json
from nnssl.data.spec import ViewSpec
from nnssl.paths import preprocessed_dataset

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Corpus:
    """Preprocessed volumes pooled from one or more nnU-Net datasets (one configuration and plans)."""

    datasets: tuple[str, ...]
    folders: tuple[Path, ...]  # one per dataset: .../DatasetXXX/<data_identifier>
    cases: tuple[tuple[int, str], ...]  # (index into folders, case identifier)
    in_channels: int
    spacing: tuple[float, ...]
    normalization: tuple[str, ...]
    # nnU-Net's foreground_intensity_properties_per_channel of the first dataset: CTNormalization's clip window
    # (percentile_00_5, percentile_99_5) and mean/std, which fine-tuning must reuse to see the same numbers
    intensity_properties: dict[str, dict[str, float]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.cases)


def load_corpus(datasets: Sequence[str | int], configuration: str = "3d_fullres",
                plans: str = "nnUNetPlans") -> Corpus:
    """The preprocessed cases of ``datasets``; errors say which nnU-Net command is missing."""
    names, folders, cases, channels, spacings, normalizations = [], [], [], set(), [], set()
    intensities = []
    for dataset in datasets:
        base = preprocessed_dataset(dataset, configuration)
        plans_file = base / f"{plans}.json"
        if not plans_file.is_file():
            raise NnsslError(f"{base.name} has no plans '{plans}' ({plans_file} is missing). Run: "
                             f"nnUNetv2_plan_and_preprocess -d {dataset} -c {configuration} (or nnssl_prepare_corpus).")
        plan = load_json(plans_file)
        if configuration not in plan["configurations"]:
            raise NnsslError(f"Plans {plans_file} have no configuration '{configuration}'; present: "
                             f"{sorted(plan['configurations'])}.")
        config = plan["configurations"][configuration]
        folder = base / config.get("data_identifier", f"{plans}_{configuration}")
        identifiers = sorted(infer_dataset_class(str(folder)).get_identifiers(str(folder))) if folder.is_dir() else []
        if not identifiers:
            raise NnsslError(f"{base.name} is not preprocessed for '{configuration}' ({folder} has no cases). "
                             f"Run: nnUNetv2_preprocess -d {dataset} -c {configuration} -p {plans}")
        dataset_json = load_json(base / "dataset.json")
        channels.add(len(dataset_json["channel_names"]))
        spacings.append(tuple(config["spacing"]))
        normalizations.update(config["normalization_schemes"])
        intensities.append(plan.get("foreground_intensity_properties_per_channel", {}))
        cases += [(len(folders), identifier) for identifier in identifiers]
        names.append(base.name)
        folders.append(folder)
    if len(channels) > 1:
        raise NnsslError(f"Datasets {names} have different numbers of input channels {sorted(channels)}; "
                         f"a pooled corpus needs one.")
    return Corpus(tuple(names), tuple(folders), tuple(cases), channels.pop(), spacings[0], tuple(sorted(normalizations)),
                  intensities[0])


class RegionDataset(IterableDataset):
    """Endless stream of samples: a random volume of this rank's shard, a random region of it, its views."""

    def __init__(self, corpus: Corpus, spec: ViewSpec, patch_size: Sequence[int], token_patch: int,
                 seed: int, rank: int = 0, world_size: int = 1, start_step: int = 0):
        self.corpus = corpus
        self.views = ViewMaker(spec, patch_size, token_patch)
        self.seed, self.rank, self.start_step = seed, rank, start_step
        self.shard = corpus.cases[rank::world_size] or corpus.cases  # fewer volumes than ranks: share them
        self._datasets: dict[int, object] = {}

    def _volume(self, folder_index: int, identifier: str):
        if folder_index not in self._datasets:
            folder = str(self.corpus.folders[folder_index])
            self._datasets[folder_index] = infer_dataset_class(folder)(folder, identifiers=None)
        return self._datasets[folder_index].load_case(identifier)[0]  # lazy blosc2 array (C, X, Y, Z)

    def read_region(self, data, size: Sequence[int], rng: np.random.Generator) -> torch.Tensor:
        """A random ``size`` region of ``data`` (C, X, Y, Z), reading only it; padded where the volume is smaller."""
        shape = data.shape[1:]
        starts = [int(rng.integers(0, max(s - r, 0) + 1)) - max(r - s, 0) // 2 for s, r in zip(shape, size)]
        src = tuple(slice(max(a, 0), min(a + r, s)) for a, r, s in zip(starts, size, shape))
        block = np.asarray(data[(slice(None), *src)], dtype=np.float32)
        if block.shape[1:] != tuple(size):
            before = [max(-a, 0) for a in starts]
            after = [r - b - n for r, b, n in zip(size, before, block.shape[1:])]
            block = np.pad(block, [(0, 0), *zip(before, after)], mode="constant", constant_values=block.min())
        return torch.from_numpy(block)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        rng = np.random.default_rng([self.seed, self.rank, worker, self.start_step])
        while True:
            folder_index, identifier = self.shard[int(rng.integers(len(self.shard)))]
            region = self.read_region(self._volume(folder_index, identifier), self.views.region_size, rng)
            yield self.views(region, rng)


def _seed_worker(worker_id: int) -> None:
    # batchgeneratorsv2 draws from numpy's and torch's global generators; give each worker its own stream
    info = get_worker_info()
    dataset = info.dataset
    seed = int(np.random.SeedSequence([dataset.seed, dataset.rank, worker_id, dataset.start_step]).generate_state(1)[0])
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_loader(dataset: RegionDataset, batch_size: int, num_workers: int, pin_memory: bool) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                      collate_fn=dataset.views.collate, worker_init_fn=_seed_worker if num_workers > 0 else None,
                      persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers > 0 else None)
