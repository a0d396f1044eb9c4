"""Paired statistics: is a method's Dice (or NSD) different from a reference's beyond case and fold noise?

For one task x shot setting, a method and a reference (scratch, or the nnU-Net baseline) are compared on the
validation cases both have, paired by (fold, case): the per-case differences method - reference, their mean,
a two-sided Wilcoxon signed-rank p-value (``scipy.stats.wilcoxon``; Wilcoxon 1945), Holm's step-down
correction across the methods compared with the same reference in the same task, shot setting and metric
(Holm 1979), and a percentile bootstrap 95% confidence interval of the mean difference
(``scipy.stats.bootstrap``, seeded). With fewer than :data:`MIN_PAIRS` pairs no p-value is given: the
signed-rank test cannot reach p < 0.05 with fewer than 6 pairs and is meaningless with a handful.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import stats as scipy_stats

MIN_PAIRS = 5
ALPHA = 0.05
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
TOO_FEW = "too few cases"

Pairs = Mapping[tuple[str, str], float]  # (fold, case) -> per-case value


def paired_difference(method: Pairs, reference: Pairs) -> dict[str, Any]:
    """Differences ``method - reference`` over the (fold, case) keys both have (NaN values left out):
    ``pairs``, ``mean_difference``, ``p_value`` (NaN under :data:`MIN_PAIRS` pairs or when every difference is
    0), ``ci_low``/``ci_high`` (bootstrap 95% CI of the mean; NaN under 2 pairs) and ``note``."""
    keys = sorted(k for k in method.keys() & reference.keys()
                  if not (math.isnan(method[k]) or math.isnan(reference[k])))
    diff = np.array([method[k] - reference[k] for k in keys], dtype=float)
    row: dict[str, Any] = {"pairs": len(diff), "mean_difference": float(diff.mean()) if len(diff) else math.nan,
                           "p_value": math.nan, "ci_low": math.nan, "ci_high": math.nan, "note": ""}
    if len(diff) < MIN_PAIRS:
        row["note"] = TOO_FEW
    elif not diff.any():
        row["note"] = "identical"
    else:
        row["p_value"] = float(scipy_stats.wilcoxon(diff).pvalue)
    if len(diff) >= 2 and np.ptp(diff) > 0:
        ci = scipy_stats.bootstrap((diff,), np.mean, confidence_level=0.95, n_resamples=BOOTSTRAP_RESAMPLES,
                                   method="percentile", rng=np.random.default_rng(BOOTSTRAP_SEED)).confidence_interval
        row["ci_low"], row["ci_high"] = float(ci.low), float(ci.high)
    elif len(diff) >= 2:  # every difference equal: the interval is that value
        row["ci_low"] = row["ci_high"] = float(diff[0])
    return row


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (NaN entries stay NaN and do not count as tests): the i-th smallest
    of m p-values becomes max over j <= i of min(1, (m - j + 1) p_(j))."""
    valid = [i for i, p in enumerate(p_values) if not math.isnan(p)]
    order = sorted(valid, key=lambda i: p_values[i])
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def comparison_table(values: Mapping[tuple[str, str, str], Pairs], references: Sequence[str],
                     metric: str) -> list[dict[str, Any]]:
    """Every method against every reference present, per task x shot.

    ``values``: (task, shot, method) -> {(fold, case): value}. Rows: task, shot, metric, method, reference,
    pairs, mean_difference, ci_low, ci_high, p_value, p_holm, significant, note. Holm's correction runs over the
    methods of one task x shot x reference.
    """
    rows = []
    for task, shot in dict.fromkeys((t, s) for t, s, _ in values):
        methods = [m for t, s, m in values if (t, s) == (task, shot)]
        for reference in references:
            if reference not in methods:
                continue
            group = [{"task": task, "shot": shot, "metric": metric, "method": method, "reference": reference,
                      **paired_difference(values[(task, shot, method)], values[(task, shot, reference)])}
                     for method in methods if method != reference]
            for row, adjusted in zip(group, holm([r["p_value"] for r in group])):
                row["p_holm"] = adjusted
                row["significant"] = bool(adjusted < ALPHA)  # NaN compares False
            rows += group
    return rows


def significance_marks(rows: Sequence[dict[str, Any]], reference_marks: Mapping[str, str]) -> dict[tuple, str]:
    """(task, shot, method, metric) -> marks such as ``"↑s"`` (better than reference ``s``) or ``"↓b"`` (worse)
    for the differences that survive Holm's correction; ``reference_marks``: reference -> letter."""
    marks: dict[tuple, str] = {}
    for row in rows:
        if row["significant"] and row["reference"] in reference_marks:
            key = (row["task"], row["shot"], row["method"], row["metric"])
            arrow = "↑" if row["mean_difference"] > 0 else "↓"
            marks[key] = marks.get(key, "") + arrow + reference_marks[row["reference"]]
    return marks
