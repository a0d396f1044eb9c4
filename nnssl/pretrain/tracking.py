"""Experiment trackers beside ``log.csv``: ``nnssl_pretrain --logger tensorboard`` writes TensorBoard event
files into the run folder (the logger of MONAI's and VoCo's pretraining scripts), one scalar per numeric
``log.csv`` column (every loss term, lr, weight decay, momentum, throughput, and whatever else a row
carries, such as a probe Dice), indexed by the step.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Protocol

from nnssl.errors import NnsslError

INSTALL_HINT = "pip install 'nnssl[tensorboard]' (or: pip install tensorboard)"
NOT_SCALARS = ("step", "time")  # the x axis, and wall time, which TensorBoard records with every event


class Tracker(Protocol):
    def append(self, row: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def require_tensorboard() -> None:
    """Fail before any work when ``--logger tensorboard`` cannot write event files."""
    try:
        import tensorboard  # noqa: F401  (torch.utils.tensorboard needs the package)
    except ImportError:
        raise NnsslError(f"--logger tensorboard needs the tensorboard package, which is not installed. Install it "
                         f"with: {INSTALL_HINT}; or leave out --logger (log.csv is always written).") from None


class TensorBoardLog:
    """Event files in ``folder``. ``start_step``: a resumed run's first step; events after it (written before
    an interruption, like the log.csv rows it drops) are purged, so curves do not fold back on themselves."""

    def __init__(self, folder: Path, start_step: int = 0):
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder), purge_step=start_step + 1 if start_step else None,
                                    flush_secs=30)

    def append(self, row: dict[str, Any]) -> None:
        step = int(row["step"])
        for key, value in row.items():
            if key in NOT_SCALARS or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue  # empty cells ("" when a method has no momentum) and text
            if math.isfinite(value):
                self.writer.add_scalar(key, value, global_step=step)

    def close(self) -> None:
        self.writer.close()


def open_tracker(logger: str, folder: Path, start_step: int = 0) -> Tracker | None:
    """The tracker ``logger`` names ("tensorboard"), or None for "csv" (log.csv alone)."""
    return TensorBoardLog(folder, start_step) if logger == "tensorboard" else None
