"""Pretraining loader throughput: nnssl's lazy blosc2 region loader vs the reference SSL pipelines' loader.

Reference (SMIT / Swin UNETR pretraining code): MONAI dictionary transforms that load the NIfTI and resample
the whole volume on every access: LoadImaged, EnsureChannelFirstd, Spacingd (2 mm), ScaleIntensityRanged
(HU -175..250 -> 0..1), RandSpatialCropSamplesd (2 crops per load, as in their configs).
Ours: ``RegionDataset`` reading one region per sample from nnU-Net-preprocessed (2 mm) blosc2 files and
making SimMIM's view set (one crop + block mask). Both run in the calling process (one worker core), so
crops/s is also the rate per DataLoader worker core. Data: synthetic CT volumes made here, converted and
preprocessed by ``nnssl_prepare_corpus``'s code. Torch runs single-threaded for both, as in a DataLoader
worker.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from nnssl.data.synthetic import SyntheticSpec, write_corpus
from nnssl.paths import environment

DATASET_ID = 601
SIZES = {False: {"volumes": 4, "shape": (112, 256, 256), "crop": 96, "seconds": 20.0},
         True: {"volumes": 8, "shape": (160, 384, 384), "crop": 128, "seconds": 60.0}}


def nnunet_folders(root: Path):
    for name in ("raw", "preprocessed"):
        (root / name).mkdir(exist_ok=True)
    return environment({"nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "preprocessed")})


def _rate(next_crops, seconds: float) -> float:
    """Crops per second of ``next_crops()`` (returns how many crops it made), after one warm-up call."""
    next_crops()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        count += next_crops()
    return count / (time.perf_counter() - start)


def reference_rate(files: list[Path], crop: int, seconds: float) -> float:
    from monai.transforms import (Compose, EnsureChannelFirstd, LoadImaged, RandSpatialCropSamplesd,
                                  ScaleIntensityRanged, Spacingd)

    transform = Compose([
        LoadImaged(keys="image"), EnsureChannelFirstd(keys="image"),
        Spacingd(keys="image", pixdim=(2.0, 2.0, 2.0), mode="bilinear"),
        ScaleIntensityRanged(keys="image", a_min=-175, a_max=250, b_min=0.0, b_max=1.0, clip=True),
        RandSpatialCropSamplesd(keys="image", roi_size=(crop,) * 3, num_samples=2, random_size=False),
    ])
    transform.set_random_state(seed=0)
    rng = np.random.default_rng(0)
    return _rate(lambda: len(transform({"image": str(files[rng.integers(len(files))])})), seconds)


def ours_rate(crop: int, seconds: float) -> float:
    from nnssl.data.loader import RegionDataset, load_corpus
    from nnssl.data.spec import MaskSpec, ViewSpec

    spec = ViewSpec(mask=MaskSpec(ratio=(0.6, 0.6), block_size=16))
    stream = iter(RegionDataset(load_corpus([DATASET_ID]), spec, (crop,) * 3, token_patch=2, seed=0))
    return _rate(lambda: next(stream) and 1, seconds)


def run(full: bool = False) -> list[dict]:
    from nnssl.data.corpus import prepare_corpus

    size = SIZES[full]
    with tempfile.TemporaryDirectory() as tmp, nnunet_folders(Path(tmp)):
        shape = size["shape"]
        files = write_corpus(Path(tmp) / "ct", size["volumes"], seed=0,
                             spec=SyntheticSpec(min_shape=shape, max_shape=shape, spacing=(0.8, 0.8, 2.5)))
        prepare_corpus(Path(tmp) / "ct", DATASET_ID, "LoaderBench", num_processes=2)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # DataLoader workers run torch with one thread
        try:
            baseline = reference_rate(files, size["crop"], size["seconds"])
            ours = ours_rate(size["crop"], size["seconds"])
        finally:
            torch.set_num_threads(threads)
    config = {"volumes": size["volumes"], "volume_voxels_zyx": list(shape), "spacing_mm": [0.8, 0.8, 2.5],
              "crop": size["crop"], "target_spacing_mm": 2.0, "workers": "1 (in-process)",
              "ours": "RegionDataset, SimMIM view set (crop + block mask)",
              "baseline": "MONAI LoadImaged+Spacingd+ScaleIntensityRanged+RandSpatialCropSamplesd(2) per load"}
    return [{"name": "loader_crops_per_s", "ours": round(ours, 3), "baseline": round(baseline, 3),
             "unit": "crops/s per worker core", "ratio": round(ours / baseline, 2), "config": config}]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="larger volumes and 128^3 crops")
    for row in run(parser.parse_args().full):
        print(row)
