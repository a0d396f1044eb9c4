"""Issue 14 paired statistics on a fixed table, against values computed by hand (exact Wilcoxon signed-rank
distribution for small n, Holm's step-down rule) and against scipy called directly."""
import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from nnssl.analysis.stats import (BOOTSTRAP_RESAMPLES, TOO_FEW, comparison_table, holm, paired_difference,
                                  significance_marks)

CASES = [("0", f"case_{i}") for i in range(8)]
SCRATCH = dict(zip(CASES, [0.50, 0.60, 0.55, 0.40, 0.70, 0.65, 0.45, 0.52]))
# method "up": better than scratch on all 8 cases (distinct differences); "mixed": 6 cases, 2 worse
UP = {k: SCRATCH[k] + d for k, d in zip(CASES, [0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08])}
MIXED = {k: SCRATCH[k] + d for k, d in zip(CASES[:6], [0.1, -0.2, 0.3, 0.4, -0.05, 0.15])}


def test_wilcoxon_p_values_match_the_exact_distribution():
    # all 8 differences positive: only 1 of 2^8 sign patterns is as extreme on each side, p = 2/256
    assert paired_difference(UP, SCRATCH)["p_value"] == pytest.approx(2 / 256)
    # ranks of |d|: 0.05->1, 0.1->2, 0.15->3, 0.2->4, 0.3->5, 0.4->6; negative ranks sum to 1 + 4 = 5, and
    # 10 of the 64 subsets of {1..6} sum to 5 or less: p = 2 * 10/64
    row = paired_difference(MIXED, SCRATCH)
    assert row["p_value"] == pytest.approx(2 * 10 / 64)
    assert row["pairs"] == 6  # paired by (fold, case): scratch's two extra cases are left out
    assert row["mean_difference"] == pytest.approx((0.1 - 0.2 + 0.3 + 0.4 - 0.05 + 0.15) / 6)


def test_bootstrap_interval_is_scipys_percentile_interval():
    row = paired_difference(MIXED, SCRATCH)
    diff = np.array([MIXED[k] - SCRATCH[k] for k in sorted(MIXED)])
    expected = scipy_stats.bootstrap((diff,), np.mean, n_resamples=BOOTSTRAP_RESAMPLES, method="percentile",
                                     rng=np.random.default_rng(0)).confidence_interval
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((expected.low, expected.high))
    assert row["ci_low"] < row["mean_difference"] < row["ci_high"]


def test_holm_step_down_by_hand():
    # m = 3 tests: 0.01 * 3 = 0.03; 0.03 * 2 = 0.06; 0.04 * 1 = 0.04 -> raised to 0.06 (monotone); NaN untouched
    adjusted = holm([0.01, 0.04, 0.03, math.nan])
    assert adjusted[:3] == pytest.approx([0.03, 0.06, 0.06]) and math.isnan(adjusted[3])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_too_few_cases_give_no_p_value():
    few = {k: SCRATCH[k] + 0.1 for k in CASES[:4]}
    row = paired_difference(few, SCRATCH)
    assert row["note"] == TOO_FEW and math.isnan(row["p_value"]) and row["pairs"] == 4
    assert row["ci_low"] == row["ci_high"] == pytest.approx(0.1)  # four equal differences


def test_comparison_table_corrects_across_methods_and_marks_survivors():
    values = {("T", "many-shot", "scratch"): SCRATCH, ("T", "many-shot", "up"): UP,
              ("T", "many-shot", "mixed"): MIXED, ("T", "many-shot", "few"): {k: 0.9 for k in CASES[:3]}}
    rows = {r["method"]: r for r in comparison_table(values, ["scratch", "nnUNetTrainer"], "dice")}
    assert set(rows) == {"up", "mixed", "few"}  # no baseline rows in this task: nothing compared with it
    # Holm over the two testable methods: 2/256 * 2 and max(that, 0.3125 * 1)
    assert rows["up"]["p_holm"] == pytest.approx(4 / 256) and rows["up"]["significant"]
    assert rows["mixed"]["p_holm"] == pytest.approx(2 * 10 / 64) and not rows["mixed"]["significant"]
    assert rows["few"]["note"] == TOO_FEW and not rows["few"]["significant"]
    marks = significance_marks(list(rows.values()), {"scratch": "s"})
    assert marks == {("T", "many-shot", "up", "dice"): "↑s"}
