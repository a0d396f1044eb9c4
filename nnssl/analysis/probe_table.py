"""The report's "probe Dice" column: linear-probe results (``nnssl_probe``'s probe.json) beside fine-tuning Dice.

Does the cheap probe predict fine-tuning? Per task and shot setting, the report lists each method's probe
Dice (mean over foreground classes; ``random`` is the probe of the scratch trainer's starting point) beside its
fine-tuning mean Dice, and the Spearman rank correlation between the two across the methods that have both
(``scipy.stats.spearmanr``; at least 3 methods, else no value).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from nnssl.analysis.results import SCRATCH
from nnssl.io import load_json

log = logging.getLogger(__name__)

MIN_METHODS = 3  # a rank correlation over fewer methods says nothing


def read_probes(folder: str | Path | None) -> dict[tuple[str, str], float]:
    """(dataset, method) -> the encoder's probe mean Dice, from every probe.json below ``folder``.

    The ``random`` baseline counts as the scratch method, whose fine-tuning starts from random weights; a
    method probed twice keeps the newest file."""
    from nnssl.probe.run import PROBE_FILENAME, PROBE_FORMAT, RANDOM

    found: dict[tuple[str, str], float] = {}
    if folder is None or not Path(folder).is_dir():
        return found
    for path in sorted(Path(folder).rglob(PROBE_FILENAME), key=lambda p: p.stat().st_mtime):
        try:
            record = load_json(path)
        except ValueError:
            log.warning("skipping %s: not valid JSON", path)
            continue
        if not isinstance(record, dict) or record.get("format") != PROBE_FORMAT:
            continue
        dataset, encoder = record["task"]["dataset"], record["encoder"]
        method = SCRATCH if encoder["method"] == RANDOM else encoder["method"]
        if encoder.get("mean_dice") is not None:
            found[(dataset, method)] = float(encoder["mean_dice"])
    return found


def probe_tables(dice_rows: list[dict[str, Any]], probes: dict[tuple[str, str], float]
                 ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(rows task x shot x method with ``probe_dice`` and ``finetune_dice``, rows task x shot with Spearman's rho)."""
    from scipy.stats import spearmanr

    rows = [{"task": r["task"], "shot": r["shot"], "method": r["method"], "probe_dice": probes[key],
             "finetune_dice": r["dice_mean"]}
            for r in dice_rows if (key := (_dataset(r["task"]), r["method"])) in probes and not math.isnan(r["dice_mean"])]
    correlations = []
    for key in dict.fromkeys((r["task"], r["shot"]) for r in rows):
        group = [r for r in rows if (r["task"], r["shot"]) == key]
        rho, p_value = (spearmanr([r["probe_dice"] for r in group], [r["finetune_dice"] for r in group])
                        if len(group) >= MIN_METHODS else (math.nan, math.nan))
        correlations.append({"task": key[0], "shot": key[1], "methods": len(group), "spearman_rho": float(rho),
                             "p_value": float(p_value)})
    return rows, correlations


def _dataset(task: str) -> str:
    """The dataset of a report task ("Dataset003_Liver", or "Dataset003_Liver [plans/configuration]")."""
    return task.split(" [")[0]
