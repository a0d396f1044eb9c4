"""Pictures of the report: per task, a Dice-vs-shots line plot and an overlay of segmentations on one slice.

The overlay shows a representative validation case (the one whose Dice is nearest the median of the best
pretrained method's many-shot cases) on its axial slice with the most ground-truth foreground: the ground
truth, then scratch and the best pretrained method (highest mean Dice in that shot setting; scratch alone
where no pretrained method ran) at the smallest shot size and many-shot, each as label outlines over the image (from nnU-Net's validation predictions,
``$nnUNet_raw`` images and ``gt_segmentations``).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from nnssl.analysis import plots
from nnssl.analysis.references import BASELINE
from nnssl.analysis.results import MANY_SHOT, SCRATCH, UNKNOWN
from nnssl.io import load_json
from nnssl.paths import nnunet_preprocessed, nnunet_raw, nnunet_results

log = logging.getLogger(__name__)

plt = plots.plt


def report_pictures(runs: Sequence[Any], dice_rows: list[dict], output: Path) -> list[tuple[str, str]]:
    """Write the shots plot and one overlay per task; returns (title, file name) pairs."""
    figures = []
    if any(r["shot"] != MANY_SHOT for r in dice_rows):
        shots_plot(dice_rows, output / "dice_vs_shots.png")
        figures.append(("Dice vs training cases (baseline dashed)", "dice_vs_shots.png"))
    for task in dict.fromkeys(r["task"] for r in dice_rows):
        name = f"overlay_{''.join(c if c.isalnum() else '_' for c in task)}.png"
        title = overlay(task, runs, [r for r in dice_rows if r["task"] == task], output / name)
        if title:
            figures.append((title, name))
    return figures


def _shot_order(shot: str) -> tuple[int, int]:
    head = shot.split("-")[0]
    return (0, int(head)) if head.isdigit() else (1, 0)


def shots_plot(dice_rows: list[dict], path: Path) -> None:
    """Mean Dice per shot setting, one line per method, one panel per task; baseline rows dashed."""
    tasks = list(dict.fromkeys(r["task"] for r in dice_rows))
    shots = sorted({r["shot"] for r in dice_rows if r["shot"] != UNKNOWN}, key=_shot_order)
    methods = list(dict.fromkeys(r["method"] for r in dice_rows))
    fig, axes = plots._panels(len(tasks), 4.8, 3.6)
    for ax, task in zip(axes, tasks):
        for i, method in enumerate(methods):
            rows = {r["shot"]: r for r in dice_rows if r["task"] == task and r["method"] == method}
            xs = [j for j, shot in enumerate(shots) if shot in rows]
            if not xs:
                continue
            baseline = next(iter(rows.values()))["family"] == BASELINE
            ax.plot(xs, [rows[shots[j]]["dice_mean"] for j in xs], marker="o", color=plots._color(i),
                    linestyle="--" if baseline else "-", label=method)
        ax.set_xticks(range(len(shots)), shots)
        ax.set_ylim(0, 1)
        ax.set_title(task, fontsize=9)
        ax.set_ylabel("mean Dice")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    plots._save(fig, path)


def overlay(task: str, runs: Sequence[Any], rows: list[dict], path: Path) -> str | None:
    """The task's overlay figure (see the module docstring); its title, or None when it cannot be drawn."""
    shots = sorted({r["shot"] for r in rows if r["shot"] != UNKNOWN}, key=_shot_order)
    pretrained = [r for r in rows if r["family"] not in (SCRATCH, BASELINE)]
    if not shots:
        return None
    settings = list(dict.fromkeys([shots[0], shots[-1]]))
    columns = []  # (method, shot)
    for shot in settings:
        best = max((r for r in pretrained if r["shot"] == shot), key=lambda r: r["dice_mean"], default=None)
        columns += [(m, shot) for m in (SCRATCH, best["method"] if best else None) if m]
    of_task = [r for r in runs if r.task == task and r.case_dice]
    reference_runs = [r for r in of_task if (r.method, r.shot) == columns[-1]]
    if not reference_runs:
        return None
    cases = {c: d for r in reference_runs for c, d in zip(r.case_ids, r.case_dice)}
    median = float(np.median(list(cases.values())))
    case = min(sorted(cases), key=lambda c: abs(cases[c] - median))
    panels = []
    for method, shot in columns:
        run = next((r for r in of_task if (r.method, r.shot) == (method, shot) and case in r.case_ids), None)
        if run is not None:
            panels.append((f"{method}, {shot}\nDice {run.case_dice[run.case_ids.index(case)]:.2f}", run))
    try:
        drawn = _draw(task, case, panels, path)
    except Exception as err:  # noqa: BLE001  a picture is never worth losing the report (e.g. $nnUNet_raw unset)
        log.warning("nnssl_report: no overlay figure for %s (%s: %s)", task, type(err).__name__, err)
        return None
    return f"Segmentations of {case} (Dice nearest the median): {task}" if drawn else None


def _draw(task: str, case: str, panels: list[tuple[str, Any]], path: Path) -> bool:
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    run = panels[0][1]
    dataset_json = load_json(nnunet_results() / run.dataset / f"{run.trainer}__{run.plans}__{run.configuration}"
                             / "dataset.json")
    ending = dataset_json["file_ending"]
    image_file = nnunet_raw() / run.dataset / "imagesTr" / f"{case}_0000{ending}"
    truth_file = nnunet_preprocessed() / run.dataset / "gt_segmentations" / f"{case}{ending}"
    if not image_file.is_file() or not truth_file.is_file():
        log.warning("nnssl_report: no overlay figure for %s: %s or %s is missing", task, image_file, truth_file)
        return False
    reader = determine_reader_writer_from_dataset_json(dataset_json, str(image_file), verbose=False)()
    image = reader.read_images([str(image_file)])[0][0]
    truth = reader.read_seg(str(truth_file))[0][0]
    z = int(np.argmax((truth > 0).reshape(truth.shape[0], -1).sum(axis=1)))  # axial slice with most foreground
    segmentations = [("ground truth", truth)]
    for title, fold_run in panels:
        folder = nnunet_results() / fold_run.dataset / (f"{fold_run.trainer}__{fold_run.plans}__"
                                                         f"{fold_run.configuration}")
        prediction = folder / f"fold_{fold_run.fold}" / "validation" / f"{case}{ending}"
        if prediction.is_file():
            segmentations.append((title, reader.read_seg(str(prediction))[0][0]))
    labels = sorted(int(v) for v in dataset_json["labels"].values() if isinstance(v, int) and v > 0)
    names = {int(v): k for k, v in dataset_json["labels"].items() if isinstance(v, int)}
    low, high = np.percentile(image[z], [1, 99])
    fig, axes = plt.subplots(1, len(segmentations), figsize=(2.8 * len(segmentations), 3.2))
    for ax, (title, seg) in zip(np.atleast_1d(axes), segmentations):
        ax.imshow(image[z], cmap="gray", vmin=low, vmax=high if high > low else low + 1)
        for i, label in enumerate(labels):
            mask = (seg[z] == label).astype(float)
            if mask.any():
                ax.contour(mask, levels=[0.5], colors=[plots._color(i)], linewidths=1.2)
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    handles = [plt.Line2D([], [], color=plots._color(i), label=names.get(label, str(label)))
               for i, label in enumerate(labels)]
    fig.legend(handles=handles, loc="lower center", ncol=len(labels), fontsize=7, frameon=False)
    fig.suptitle(f"{task}: {case}, slice {z}", fontsize=9)
    plots._save(fig, path)
    return True
