"""Environment variables, read when used (as nnU-Net's ``paths.py`` does), with errors that say what to set.

nnU-Net's own variables (``nnUNet_raw``, ``nnUNet_preprocessed``, ``nnUNet_results``) keep their meaning;
``nnssl_results`` is ours: pretraining runs live in ``$nnssl_results/<method>/<run>/``.
"""
from __future__ import annotations

import contextlib
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from nnssl.errors import NnsslError

_PURPOSE = {
    "nnUNet_raw": "the folder with raw datasets in nnU-Net format (DatasetXXX_Name/imagesTr, ...)",
    "nnUNet_preprocessed": "the folder nnUNetv2_plan_and_preprocess writes to",
    "nnUNet_results": "the folder nnUNetv2_train writes trained models to",
    "nnssl_results": "the folder nnssl_pretrain writes pretraining runs to",
}


def env_dir(name: str, must_exist: bool = True) -> Path:
    """The folder named by environment variable ``name``; a clear NnsslError if unset or missing."""
    value = os.environ.get(name)
    if not value:
        raise NnsslError(
            f"Environment variable {name} is not set. It must point to {_PURPOSE.get(name, 'a folder')}.\n"
            f"Set it, for example: export {name}=/data/{name}"
        )
    path = Path(value)
    if must_exist and not path.is_dir():
        raise NnsslError(
            f"{name}={value} does not exist or is not a folder. Create it (mkdir -p {value}) "
            f"or point {name} to {_PURPOSE.get(name, 'an existing folder')}."
        )
    return path


def nnssl_results() -> Path:
    from nnssl.foreign import check_results_layout

    path = env_dir("nnssl_results", must_exist=False)
    check_results_layout(path)
    return path


def nnunet_raw() -> Path:
    return env_dir("nnUNet_raw")


def nnunet_preprocessed() -> Path:
    return env_dir("nnUNet_preprocessed")


def nnunet_results() -> Path:
    return env_dir("nnUNet_results", must_exist=False)


def dataset_folder(root: Path, dataset: str | int, root_variable: str) -> Path:
    """``root/DatasetXXX_Name`` for a dataset id (``3``, ``"003"``) or full name; errors list what exists."""
    text = str(dataset)
    if text.startswith("Dataset"):
        candidates = [root / text]
    else:
        try:
            number = int(text)
        except ValueError:
            raise NnsslError(
                f"Dataset '{text}' is neither an nnU-Net dataset id (e.g. 3 or 003) nor a name "
                f"like Dataset003_Liver."
            ) from None
        candidates = sorted(root.glob(f"Dataset{number:03d}_*")) if root.is_dir() else []
    found = [c for c in candidates if c.is_dir()]
    if len(found) == 1:
        return found[0]
    existing = sorted(p.name for p in root.glob("Dataset*")) if root.is_dir() else []
    if len(found) > 1:
        raise NnsslError(f"Dataset id {text} matches several folders in ${root_variable} ({root}): "
                         f"{[p.name for p in found]}. Use the full name.")
    raise NnsslError(
        f"No dataset '{text}' in ${root_variable} ({root}). Present: {existing or 'none'}."
    )


def preprocessed_dataset(dataset: str | int, configuration: str = "3d_fullres") -> Path:
    """``$nnUNet_preprocessed/DatasetXXX_Name``; a dataset that is only in ``$nnUNet_raw`` gets an error that
    says which nnU-Net command preprocesses it."""
    root = nnunet_preprocessed()  # unset or missing: that error, not "not preprocessed"
    try:
        return dataset_folder(root, dataset, "nnUNet_preprocessed")
    except NnsslError:
        raw_root = os.environ.get("nnUNet_raw")
        try:
            raw = dataset_folder(Path(raw_root), dataset, "nnUNet_raw") if raw_root else None
        except NnsslError:
            raw = None
        if raw is not None:
            raise NnsslError(f"{raw.name} is in $nnUNet_raw but has not been preprocessed. Run: "
                             f"nnUNetv2_plan_and_preprocess -d {dataset} -c {configuration}") from None
        raise


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """Set the environment variables ``values`` inside the block; afterwards each has its earlier value
    again (or is unset, if it was)."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def nnunet_planner_environment() -> contextlib.AbstractContextManager[None]:
    """The environment nnU-Net 2.8.1's planner needs: it calls ``torch.set_num_threads(nnUNet_n_proc_DA)``, which
    fails for the valid training setting ``nnUNet_n_proc_DA=0``."""
    return environment({"nnUNet_n_proc_DA": "1"} if os.environ.get("nnUNet_n_proc_DA") == "0" else {})
