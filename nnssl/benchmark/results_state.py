"""What the study planner knows about the disk: which inputs exist and which jobs are ``new``, to ``resume`` or
``done``. :class:`ResultsState` is what :func:`nnssl.benchmark.jobs.plan_study` asks (tests answer it with
hand-made states); :class:`DiskState` answers it from nnU-Net's and nnssl's folders."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from nnssl.benchmark.study import Study
from nnssl.errors import NnsslError
from nnssl.fewshot import FEWSHOT_FILENAME, SPLITS_FILENAME
from nnssl.io import load_json

NEW, RESUME, DONE = "new", "resume", "done"


class ResultsState(Protocol):
    """What the planner needs to know about the disk."""

    def raw_ready(self, dataset: str) -> bool: ...
    def preprocessed(self, dataset: str, plans: str | None = None) -> bool: ...  # None: the study's plans
    def fewshot(self, dataset: str) -> tuple[dict[str, dict], int]: ...  # fewshot.json folds, folds in splits
    def pretrain(self, method: str, run: str) -> str: ...
    def finetune(self, dataset: str, trainer: str, fold: int, plans: str | None = None,
                 configuration: str | None = None) -> str: ...
    def model_folder(self, dataset: str, trainer: str, plans: str | None = None,
                     configuration: str | None = None) -> Path: ...
    def file_exists(self, path: Path) -> bool: ...


@dataclass(frozen=True)
class DiskState:
    """:class:`ResultsState` read from nnU-Net's and nnssl's folders (missing folders: nothing is done)."""

    raw_dir: Path
    preprocessed_dir: Path
    results_dir: Path
    nnssl_results_dir: Path
    study: Study

    def raw_ready(self, dataset: str) -> bool:
        from nnssl.benchmark.raw_dataset import is_complete

        return is_complete(self.raw_dir / dataset)

    def preprocessed(self, dataset: str, plans: str | None = None) -> bool:
        """``plans`` (default: the study's) written and one preprocessed case (``.pkl``, nnU-Net writes it last) per
        training case."""
        folder = self.preprocessed_dir / dataset
        plans, meta = folder / f"{plans or self.study.plans_identifier}.json", folder / "dataset.json"
        if not plans.is_file() or not meta.is_file():
            return False
        try:
            expected = load_json(meta)["numTraining"]
            data = load_json(plans)["configurations"][self.study.configuration]["data_identifier"]
        except (ValueError, KeyError):
            return False
        return len(list((folder / data).glob("*.pkl"))) == expected

    def fewshot(self, dataset: str) -> tuple[dict[str, dict], int]:
        from nnssl.fewshot import load_fewshot

        folder = self.preprocessed_dir / dataset
        splits = folder / SPLITS_FILENAME
        try:
            num_splits = len(load_json(splits)) if splits.is_file() else 0
        except ValueError:
            raise NnsslError(f"{splits} is damaged; restore it or delete it with {FEWSHOT_FILENAME}.") from None
        return load_fewshot(folder), num_splits

    def pretrain(self, method: str, run: str) -> str:
        folder = self.nnssl_results_dir / method / run
        if (folder / "encoder_final.pth").is_file():
            return DONE
        return RESUME if (folder / "config.json").is_file() else NEW

    def model_folder(self, dataset: str, trainer: str, plans: str | None = None,
                     configuration: str | None = None) -> Path:
        """nnU-Net's trained-model folder ``$nnUNet_results/DatasetXXX/<trainer>__<plans>__<configuration>``
        (the study's plans and configuration unless given)."""
        return self.results_dir / dataset / (f"{trainer}__{plans or self.study.plans_identifier}__"
                                             f"{configuration or self.study.configuration}")

    def finetune(self, dataset: str, trainer: str, fold: int, plans: str | None = None,
                 configuration: str | None = None) -> str:
        folder = self.model_folder(dataset, trainer, plans, configuration) / f"fold_{fold}"
        final = (folder / "checkpoint_final.pth").is_file()
        if final and (folder / "validation" / "summary.json").is_file():
            return DONE
        # --c continues from checkpoint_latest.pth, or only validates when checkpoint_final.pth exists
        return RESUME if final or (folder / "checkpoint_latest.pth").is_file() else NEW

    def file_exists(self, path: Path) -> bool:
        return path.is_file()
