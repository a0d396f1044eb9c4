"""Everything a pretraining run keeps on disk: log.csv, progress.png and checkpoints.

``$nnssl_results/<method>/<run>/`` holds ``config.json``, ``log.csv`` (one row per logged step),
``progress.png``, ``checkpoint_latest.pth`` (every ``checkpoint_every`` steps; the one before it is kept as
``checkpoint_previous.pth``), ``checkpoint_final.pth``, ``encoder_final.pth`` and, for methods with a
teacher, ``encoder_teacher_final.pth``. Every file is written atomically. ``run.lock`` and ``run.owner.json``
belong to the run's lock (:mod:`nnssl.pretrain.run_lock`).
"""
from __future__ import annotations

import csv
import io
import logging
import os
from pathlib import Path
from typing import Any

import torch

from nnssl.errors import NnsslError
from nnssl.io import atomic_path, disk_errors, save_text, save_torch, write_torch
from nnssl.pretrain.tracking import Tracker

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "nnssl-pretrain-checkpoint"
CHECKPOINT_COLUMN = "checkpoint"
LATEST, PREVIOUS, FINAL = "checkpoint_latest.pth", "checkpoint_previous.pth", "checkpoint_final.pth"


class CsvLog:
    """``log.csv``: appended and flushed per row; on resume, rows after the checkpoint's step are dropped.

    The last column, ``checkpoint``, is the step of the newest ``checkpoint_latest.pth`` written before the row
    (empty before the first), so that ``--resume`` can tell a checkpoint older than the log says (a rename lost
    in a crash) from the usual case (a checkpoint newer than the last row).
    A ``mirror`` (e.g. TensorBoard, ``nnssl.pretrain.tracking``) receives every appended row as well.
    """

    def __init__(self, path: Path, mirror: Tracker | None = None):
        self.path = path
        self.mirror = mirror
        self.columns: list[str] | None = None
        self.last_checkpoint: int | None = None
        if path.is_file() and path.stat().st_size:
            with open(path, newline="", encoding="utf-8") as f:
                self.columns = next(csv.reader(f), None)

    def logged_checkpoint(self) -> int | None:
        """The newest checkpoint step the log records, None if it records none."""
        steps = [row.get(CHECKPOINT_COLUMN) for row in self.rows()]
        return next((int(s) for s in reversed(steps) if s), None)

    def checkpointed(self, step: int) -> None:
        """``checkpoint_latest.pth`` of ``step`` is on disk: the next rows record it."""
        self.last_checkpoint = step

    def truncate_after(self, step: int) -> None:
        self.last_checkpoint = step if step > 0 else None
        if self.columns is None:
            return
        if CHECKPOINT_COLUMN not in self.columns:  # a log written before the column existed
            self.columns.append(CHECKPOINT_COLUMN)
        rows = [row for row in self.rows() if int(row["step"]) <= step]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.columns)
        writer.writeheader()
        writer.writerows(rows)
        save_text(buffer.getvalue(), self.path)

    def rows(self) -> list[dict[str, str]]:
        if not self.path.is_file():
            return []
        with open(self.path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))

    def append(self, row: dict[str, Any]) -> None:
        row = {**row, CHECKPOINT_COLUMN: "" if self.last_checkpoint is None else self.last_checkpoint}
        with disk_errors(self.path):
            if self.columns is None:
                self.columns = list(row)
                with open(self.path, "w", newline="", encoding="utf-8") as f:
                    csv.writer(f).writerow(self.columns)
            missing = [c for c in row if c not in self.columns]
            if missing:
                raise RuntimeError(f"log.csv columns {self.columns} lack {missing}; a method must log the same terms "
                                   f"every step")
            with open(self.path, "a", newline="", encoding="utf-8") as f:
                csv.DictWriter(f, fieldnames=self.columns).writerow(
                    {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        if self.mirror is not None:
            self.mirror.append(row)

    def close(self) -> None:
        if self.mirror is not None:
            self.mirror.close()


def plot_progress(log: CsvLog, path: Path, title: str, terms: list[str]) -> None:
    """``progress.png``: the method's logged ``terms`` (losses and statistics) and the learning rate by step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = log.rows()
    if not rows:
        return
    steps = [int(r["step"]) for r in rows]
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=(3, 1))
    for term in terms:
        ax_loss.plot(*_series(steps, rows, term), label=term, linewidth=1.5 if term == "loss" else 1)
    if any(r.get("probe_dice") for r in rows):  # nnssl_pretrain --probe: on its own 0-1 axis beside the loss
        ax_probe = ax_loss.twinx()
        ax_probe.plot(*_series(steps, rows, "probe_dice"), "o-", color="black", label="probe_dice")
        ax_probe.set_ylabel("probe Dice")
        ax_probe.set_ylim(0, 1)
        ax_probe.legend(fontsize=8, loc="upper right")
    ax_loss.set_ylabel("value")
    ax_loss.set_title(title)
    ax_loss.legend(fontsize=8, ncol=2)
    ax_loss.grid(alpha=0.3)
    ax_lr.plot(*_series(steps, rows, "lr"), color="tab:gray")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def _series(steps: list[int], rows: list[dict[str, str]], column: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the rows where ``column`` has a value (the probe's step-0 row has no loss)."""
    pairs = [(step, float(row[column])) for step, row in zip(steps, rows) if row.get(column)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def save_checkpoint(folder: Path, state: dict[str, Any], final: bool = False) -> None:
    """Write ``checkpoint_latest.pth`` (keeping the one it replaces as ``checkpoint_previous.pth``) or the final one."""
    state = {"format": CHECKPOINT_FORMAT, **state}
    if final:
        save_torch(state, folder / FINAL)
        return
    latest = folder / LATEST
    with atomic_path(latest) as tmp:
        write_torch(state, tmp)
        if latest.is_file():
            os.replace(latest, folder / PREVIOUS)


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated zip, pickle errors, ...
        raise NnsslError(f"Checkpoint {path} is corrupt or truncated ({type(err).__name__}: {err}).") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise NnsslError(f"{path} is not an nnssl pretraining checkpoint.")
    return state


def latest_good_checkpoint(folder: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest readable checkpoint to resume from (latest, else previous); None if the run has none.

    A corrupt ``checkpoint_latest.pth`` falls back to ``checkpoint_previous.pth``; if both are unusable the
    error says so and what to do.
    """
    errors = []
    for name in (LATEST, PREVIOUS):
        path = folder / name
        if path.is_file():
            try:
                return path, load_checkpoint(path)
            except NnsslError as err:
                errors.append(str(err))
    if errors:
        raise NnsslError("Cannot resume: " + " ".join(errors) + f" Delete the damaged files in {folder} to start "
                         f"the run again, or start a new --run.")
    return None


def reconcile_with_log(folder: Path, found: tuple[Path, dict[str, Any]] | None) -> None:
    """Compare the checkpoint ``--resume`` found with the newest one ``log.csv`` records, and say which is used.

    A checkpoint older than the log's record means the newer file was lost (a crash before its rename reached
    the disk, or a damaged ``checkpoint_latest.pth`` replaced by ``checkpoint_previous.pth``): the run continues
    from the checkpoint on disk and trains the steps after it again.
    """
    logged = CsvLog(folder / "log.csv").logged_checkpoint()
    if found is None:
        if logged is not None:
            log.warning("log.csv of %s records a checkpoint of step %d, but the folder has no checkpoint (lost in a "
                        "crash, or deleted): the run starts again from step 0", folder, logged)
        return
    path, state = found
    step = int(state["step"])
    if logged is None or step == logged:
        return
    if step < logged:
        log.warning("%s holds step %d, but log.csv records a checkpoint of step %d (that file was lost or is "
                    "damaged): resuming from step %d, the checkpoint on disk, and training steps %d-%d again",
                    path, step, logged, step, step + 1, logged)
    else:
        log.info("%s holds step %d, saved after the last row of log.csv (which records step %d): resuming from "
                 "step %d", path, step, logged, step)
