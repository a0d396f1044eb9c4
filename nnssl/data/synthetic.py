"""Small synthetic abdominal CT and MRI volumes in nnU-Net raw format, for tests and the demo.

Each case is a torso (fat, muscle, spine, lung bases) with liver, spleen, two kidneys and sometimes a liver
tumour, at random sizes and positions. CT intensities are Hounsfield units (air -1000, fat about -100,
liver about 110, bone several hundred); the MRI variant maps the same anatomy to T2-like intensities with
a smooth bias field. Spacing is anisotropic (thick axial slices), as in clinical CT.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import gaussian_filter

from nnssl.errors import NnsslError

LABELS = {"background": 0, "liver": 1, "spleen": 2, "kidney": 3, "tumour": 4}

# tissue -> (CT HU mean, MRI T2-like mean). CT organs as in a portal-venous contrast phase (liver enhanced
# well above muscle, spleen above liver, kidney cortex above both, tumour hypodense), so that every organ differs
# from its neighbours by several noise standard deviations, as in the MRI column: a short schedule (the demo's)
# can learn them.
TISSUE_INTENSITY = {
    "air": (-1000.0, 0.0),
    "fat": (-100.0, 60.0),  # fat-suppressed in T2-SPIR
    "muscle": (45.0, 110.0),
    "lung": (-850.0, 15.0),
    "bone": (700.0, 40.0),
    "liver": (110.0, 160.0),
    "spleen": (170.0, 320.0),
    "kidney": (240.0, 420.0),
    "tumour": (30.0, 520.0),
}
TISSUES = list(TISSUE_INTENSITY)
NOISE_STD = {"CT": 12.0, "MRI": 12.0}


@dataclass(frozen=True)
class SyntheticSpec:
    """Shape (z, y, x voxels) range, spacing (x, y, z mm) and modality of generated volumes; ``organ_scale``
    multiplies the radii of spleen and kidneys (small volumes, as the demo's, would leave them a few voxels)."""

    modality: str = "CT"
    min_shape: tuple[int, int, int] = (28, 72, 72)
    max_shape: tuple[int, int, int] = (36, 88, 88)
    spacing: tuple[float, float, float] = (1.6, 1.6, 2.5)
    organ_scale: float = 1.0


def _ellipsoid(grid: tuple[np.ndarray, ...], center, radii, rng: np.random.Generator) -> np.ndarray:
    """Boolean ellipsoid with a random in-plane rotation and a lobulated (wobbly) surface."""
    z, y, x = grid
    angle = rng.uniform(-0.6, 0.6)
    c, s = np.cos(angle), np.sin(angle)
    dy, dx = y - center[1], x - center[2]
    ry, rx = c * dy - s * dx, s * dy + c * dx
    r = ((z - center[0]) / radii[0]) ** 2 + (ry / radii[1]) ** 2 + (rx / radii[2]) ** 2
    wobble = 0.12 * np.sin(3 * np.arctan2(ry, rx) + rng.uniform(0, 2 * np.pi))
    return r < 1.0 + wobble


def synthetic_case(rng: np.random.Generator, spec: SyntheticSpec) -> tuple[np.ndarray, np.ndarray]:
    """One ``(image, labels)`` pair, arrays of shape ``(z, y, x)``: image float32, labels uint8."""
    shape = tuple(int(rng.integers(lo, hi + 1)) for lo, hi in zip(spec.min_shape, spec.max_shape))
    grid = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    z, y, x = grid
    nz, ny, nx = shape
    cy, cx = ny / 2 + rng.normal(0, 2), nx / 2 + rng.normal(0, 2)
    body_r = (ny * rng.uniform(0.36, 0.44), nx * rng.uniform(0.40, 0.47))
    body = ((y - cy) / body_r[0]) ** 2 + ((x - cx) / body_r[1]) ** 2 < 1.0
    inner = ((y - cy) / (body_r[0] - 4)) ** 2 + ((x - cx) / (body_r[1] - 4)) ** 2 < 1.0

    tissue = np.full(shape, TISSUES.index("air"), dtype=np.uint8)
    tissue[body] = TISSUES.index("fat")
    tissue[inner] = TISSUES.index("muscle")
    lung = inner & (z > nz * rng.uniform(0.72, 0.85)) & (np.abs(x - cx) > body_r[1] * 0.15)
    tissue[lung] = TISSUES.index("lung")
    spine = ((y - (cy + body_r[0] * 0.6)) ** 2 + (x - cx) ** 2) < (rng.uniform(3.0, 4.5)) ** 2
    tissue[spine & body] = TISSUES.index("bone")

    labels = np.zeros(shape, dtype=np.uint8)
    organs = {
        "liver": ((nz * 0.55, cy - body_r[0] * 0.05, cx - body_r[1] * 0.42),
                  (nz * 0.28, body_r[0] * 0.45, body_r[1] * 0.34)),
        "spleen": ((nz * 0.6, cy + body_r[0] * 0.2, cx + body_r[1] * 0.55),
                   (nz * 0.16, body_r[0] * 0.2, body_r[1] * 0.15)),
    }
    for side in (-1, 1):
        organs[f"kidney{side}"] = ((nz * 0.4, cy + body_r[0] * 0.45, cx + side * body_r[1] * 0.32),
                                   (nz * 0.17, body_r[0] * 0.16, body_r[1] * 0.11))
    for organ, (center, radii) in organs.items():
        scale = 1.0 if organ == "liver" else spec.organ_scale
        center = tuple(c + rng.normal(0, 1.2) for c in center)
        radii = tuple(r * scale * rng.uniform(0.85, 1.15) for r in radii)
        mask = _ellipsoid(grid, center, radii, rng) & inner & ~lung
        name = "kidney" if organ.startswith("kidney") else organ
        tissue[mask] = TISSUES.index(name)
        labels[mask] = LABELS[name]
    liver = labels == LABELS["liver"]
    if liver.sum() > 200 and rng.random() < 0.8:
        zz, yy, xx = np.nonzero(liver)
        i = int(rng.integers(len(zz)))
        radius = rng.uniform(2.5, 4.5)
        tumour = _ellipsoid(grid, (zz[i], yy[i], xx[i]), (radius * 0.7, radius, radius), rng) & liver
        tissue[tumour] = TISSUES.index("tumour")
        labels[tumour] = LABELS["tumour"]

    column = 0 if spec.modality == "CT" else 1
    lookup = np.array([TISSUE_INTENSITY[name][column] for name in TISSUES], dtype=np.float32)
    image = lookup[tissue]
    image = image * rng.uniform(0.95, 1.05) if spec.modality == "MRI" else image
    image = gaussian_filter(image, sigma=0.7)  # partial-volume edges
    image += gaussian_filter(rng.normal(0, 1, shape).astype(np.float32), 3) * 8  # low-frequency texture
    image += rng.normal(0, NOISE_STD[spec.modality], shape).astype(np.float32)
    if spec.modality == "MRI":
        bias = 1.0 + 0.25 * np.sin(x / nx * np.pi * rng.uniform(0.5, 1.5) + rng.uniform(0, 3))
        image = np.clip(image * bias, 0, None)
    else:
        image = np.clip(image, -1024, 3071)
    return image.astype(np.float32), labels


def _write(array: np.ndarray, spacing: tuple[float, float, float], path: Path, dtype) -> None:
    img = sitk.GetImageFromArray(array.astype(dtype))
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetOrigin((-120.0, -100.0, -300.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path), useCompression=True)


def _case_spacing(rng: np.random.Generator, spec: SyntheticSpec) -> tuple[float, float, float]:
    inplane = spec.spacing[0] * rng.uniform(0.9, 1.1)
    return (inplane, inplane, spec.spacing[2] * rng.choice([0.8, 1.0, 1.2]))


def write_task(raw_root: Path, dataset_id: int, name: str, num_training: int, num_test: int = 0,
               modality: str = "CT", seed: int = 0, spec: SyntheticSpec | None = None) -> Path:
    """Write ``raw_root/DatasetXXX_name`` in nnU-Net raw format (imagesTr, labelsTr, imagesTs, dataset.json)."""
    if modality not in NOISE_STD:
        raise NnsslError(f"Unknown modality '{modality}' for synthetic data; use one of {sorted(NOISE_STD)}.")
    if num_training < 2:
        raise NnsslError(f"A synthetic task needs at least 2 training cases; got {num_training}.")
    spec = spec or SyntheticSpec(modality=modality)
    if spec.modality != modality:
        spec = replace(spec, modality=modality)
    folder = Path(raw_root) / f"Dataset{dataset_id:03d}_{name}"
    rng = np.random.default_rng(seed)
    image_dtype = np.int16 if modality == "CT" else np.float32
    for i in range(num_training + num_test):
        image, labels = synthetic_case(rng, spec)
        spacing = _case_spacing(rng, spec)
        case = f"{name}_{i:03d}"
        split = "Tr" if i < num_training else "Ts"
        _write(image, spacing, folder / f"images{split}" / f"{case}_0000.nii.gz", image_dtype)
        if split == "Tr":
            _write(labels, spacing, folder / "labelsTr" / f"{case}.nii.gz", np.uint8)
    channel = "CT" if modality == "CT" else "T2"
    dataset_json = {
        "channel_names": {"0": channel},
        "labels": LABELS,
        "numTraining": num_training,
        "file_ending": ".nii.gz",
        "imaging_modality": modality,  # not "modality": nnU-Net reads that legacy key as the channel list
        "name": name,
        "description": f"Synthetic abdominal {modality} generated by nnssl (seed {seed}); toy data for tests.",
        "licence": "CC0 (generated)",
    }
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2) + "\n", encoding="utf-8")
    return folder


def write_corpus(out_dir: Path, num_volumes: int, seed: int = 0, spec: SyntheticSpec | None = None) -> list[Path]:
    """Write unlabelled CT volumes ``ct_XXXX.nii.gz`` to ``out_dir`` (raw input of nnssl_prepare_corpus)."""
    spec = spec or SyntheticSpec(modality="CT")
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(num_volumes):
        image, _ = synthetic_case(rng, spec)
        path = Path(out_dir) / f"ct_{i:04d}.nii.gz"
        _write(image, _case_spacing(rng, spec), path, np.int16)
        paths.append(path)
    return paths
