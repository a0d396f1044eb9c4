"""PNG figures of the analysis tools (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import math
import os
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from nnssl.io import atomic_path  # noqa: E402

DPI = 120


def _save(fig: plt.Figure, path: str | os.PathLike) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=DPI, format="png")
    plt.close(fig)


def cka_heatmaps(comparisons: Sequence[dict], path: str | os.PathLike, kernel: str = "linear") -> None:
    """One layer x layer CKA heatmap per comparison (``{"a", "b", "layers_a", "layers_b", "cka"}``)."""
    fig, axes = _panels(len(comparisons), 5.2, 4.6)
    for ax, comparison in zip(axes, comparisons):
        matrix = np.asarray(comparison["cka"], dtype=float)
        image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="magma", origin="lower", aspect="auto")
        ax.set_xticks(range(len(comparison["layers_b"])), comparison["layers_b"], rotation=60, ha="right",
                      fontsize=7)
        ax.set_yticks(range(len(comparison["layers_a"])), comparison["layers_a"], fontsize=7)
        ax.set_xlabel(comparison["b"], fontsize=8)
        ax.set_ylabel(comparison["a"], fontsize=8)
        if matrix.size <= 100:  # small matrices: print the values
            for (i, j), value in np.ndenumerate(matrix):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6,
                        color="black" if value > 0.6 else "white")
        fig.colorbar(image, ax=ax, label=f"{kernel} CKA", fraction=0.046)
    _save(fig, path)


def cka_diagonal(comparisons: Sequence[dict], layer_order: Sequence[str], path: str | os.PathLike) -> None:
    """Same-layer CKA by depth (layers in ``layer_order``), one line per comparison (``"diagonal"`` dicts)."""
    layers = [name for name in layer_order if any(name in c["diagonal"] for c in comparisons)]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(layers) + 2), 4.2))
    for comparison in comparisons:
        xs = [i for i, name in enumerate(layers) if name in comparison["diagonal"]]
        ys = [comparison["diagonal"][layers[i]] for i in xs]
        ax.plot(xs, ys, marker="o", label=f"{comparison['a']} vs {comparison['b']}")
    ax.set_xticks(range(len(layers)), layers, rotation=45, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("CKA (same layer)")
    ax.set_xlabel("layer (input -> output)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def _color(index: int) -> str:
    return f"C{index % 10}"  # matplotlib's default cycle: the same method/shot keeps its colour in every panel


def _grouped_bars(ax: plt.Axes, groups: Sequence[str], series: dict[str, tuple[list[float], list[float] | None]],
                  ylabel: str) -> None:
    """Bars for each group (x ticks), one bar per series (legend, coloured by series position); ``series``:
    label -> (values, errors); NaN values leave a gap."""
    width = 0.8 / max(1, len(series))
    for k, (label, (values, errors)) in enumerate(series.items()):
        xs = np.arange(len(groups)) + (k - (len(series) - 1) / 2) * width
        ax.bar(xs, values, width, yerr=errors, capsize=2, label=label, color=_color(k), error_kw={"elinewidth": 0.8})
    ax.set_xticks(range(len(groups)), groups, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)


def _panels(count: int, width: float, height: float, max_cols: int = 3) -> tuple[plt.Figure, list[plt.Axes]]:
    cols = max(1, min(count, max_cols))
    rows = max(1, math.ceil(count / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in list(axes.flat)[count:]:
        ax.axis("off")
    return fig, list(axes.flat)[:count]


def dice_bars(dice_rows: Sequence[dict], methods: Sequence[str], shots: Sequence[str], path: str | os.PathLike) -> None:
    """One panel per task: mean Dice (error bar: standard deviation over cases) per method, a bar per shot
    setting (``methods``, ``shots``: display order)."""
    tasks = list(dict.fromkeys(r["task"] for r in dice_rows))
    fig, axes = _panels(len(tasks), 5.5, 4.0)
    for ax, task in zip(axes, tasks):
        table = {(r["method"], r["shot"]): r for r in dice_rows if r["task"] == task}
        present = [m for m in methods if any((m, shot) in table for shot in shots)]
        series = {shot: ([table[(m, shot)]["dice_mean"] if (m, shot) in table else np.nan for m in present],
                         [np.nan_to_num(table[(m, shot)]["dice_std"]) if (m, shot) in table else 0.0 for m in present])
                  for shot in shots}
        _grouped_bars(ax, present, series, "Dice")
        ax.set_ylim(0, 1)
        ax.set_title(f"{task} ({next(iter(table.values()))['modality']})", fontsize=9)
    _save(fig, path)


def convergence_curves(task: str, curves: dict[str, dict[str, dict[str, np.ndarray]]], methods: Sequence[str],
                       path: str | os.PathLike) -> None:
    """Per shot setting (columns): EMA pseudo-Dice and validation loss by epoch, one line per method (colour
    by position in ``methods``). ``curves``: shot -> method -> {"ema_fg_dice": (E,), "val_losses": (E,)}."""
    fig, axes = plt.subplots(2, len(curves), figsize=(5.0 * len(curves), 6.4), squeeze=False, sharex="col")
    for col, (shot, by_method) in enumerate(curves.items()):
        for method, series in by_method.items():
            for row, key in enumerate(("ema_fg_dice", "val_losses")):
                values = series[key]
                axes[row, col].plot(np.arange(1, len(values) + 1), values, label=method, marker=".",
                                    color=_color(methods.index(method)))
        axes[0, col].set_title(f"{task}: {shot}", fontsize=9)
        axes[0, col].set_ylabel("pseudo-Dice (EMA)")
        axes[1, col].set_ylabel("validation loss")
        axes[1, col].set_xlabel("epoch")
        axes[1, col].xaxis.set_major_locator(MaxNLocator(integer=True))
        axes[0, col].legend(fontsize=7)
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
    _save(fig, path)


def gap_bars(gap_rows: Sequence[dict], methods: Sequence[str], shots: Sequence[str], path: str | os.PathLike) -> None:
    """Per method: many-shot minus few-shot mean Dice averaged over tasks, one bar per few-shot setting."""
    present = [m for m in methods if any(r["method"] == m for r in gap_rows)]
    series = {}
    for shot in (s for s in shots if any(r["shot"] == s for r in gap_rows)):
        gaps = [[r["gap"] for r in gap_rows if r["method"] == m and r["shot"] == shot] for m in present]
        series[shot] = ([float(np.mean(g)) if g else np.nan for g in gaps], None)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(present) + 2), 4.0))
    _grouped_bars(ax, present, series, "many-shot Dice - few-shot Dice")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_title("Few-shot to many-shot gap (mean over tasks)", fontsize=9)
    _save(fig, path)


def modality_bars(modality_rows: Sequence[dict], methods: Sequence[str], shots: Sequence[str],
                  path: str | os.PathLike) -> None:
    """Per shot setting: mean Dice over CT tasks and over MRI tasks, side by side for each method."""
    present_shots = [s for s in shots if any(r["shot"] == s for r in modality_rows)]
    fig, axes = _panels(len(present_shots), 5.5, 4.0)
    for ax, shot in zip(axes, present_shots):
        table = {r["method"]: r for r in modality_rows if r["shot"] == shot}
        present = [m for m in methods if m in table]
        _grouped_bars(ax, present, {m: ([table[p][f"{m}_dice"] for p in present], None) for m in ("CT", "MRI")},
                      "mean Dice")
        ax.set_ylim(0, 1)
        ax.set_title(f"CT vs MRI tasks: {shot}", fontsize=9)
    _save(fig, path)
