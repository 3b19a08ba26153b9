"""The bias statistics from database aggregates (counts, sums, sums of squares) equal those from the rows."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from finetune.ml.fairness import (
    HIGHER,
    LOWER,
    MEAN,
    RATE,
    CellStats,
    Metric,
    adjust_family,
    bootstrap_mean_interval,
    bootstrap_mean_interval_from_counts,
    disaggregate,
    disaggregate_cells,
    histogram_coarsen,
    mean_test,
    rate_test,
    segment_drafts_from_stats,
    segment_report,
    segment_report_from_stats,
    t_mean_interval,
    welch_test_from_stats,
)

BAD = Metric("bad", RATE, LOWER)
SCORE = Metric("score", MEAN, HIGHER)
INTENTS = ["refund", "track", "cancel"]


def rows(seed: int = 3, n: int = 600) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "region": rng.choice(["north", "south", "east"], size=n, p=[0.5, 0.3, 0.2]),
            "intent": rng.choice(INTENTS, size=n),
            "score": rng.integers(1, 6, size=n).astype(float),
        }
    )
    # South is served worse on refunds: a real gap for the tests to find.
    base = np.where(frame["intent"] == "refund", 0.3, 0.1)
    base = base + np.where((frame["region"] == "south") & (frame["intent"] == "refund"), 0.3, 0.0)
    frame["bad"] = (rng.random(n) < base).astype(float)
    return frame


def cell_stats(values: np.ndarray, codes: np.ndarray) -> CellStats:
    return CellStats(
        np.bincount(codes, minlength=len(INTENTS)).astype(float),
        np.bincount(codes, weights=values, minlength=len(INTENTS)),
        np.bincount(codes, weights=values**2, minlength=len(INTENTS)),
    )


def stats_of(frame: pd.DataFrame):
    codes = frame["intent"].map(INTENTS.index).to_numpy()
    population = {m: cell_stats(frame[m].to_numpy(), codes) for m in ("bad", "score")}
    segments = {}
    for region in sorted(frame["region"].unique()):
        mask = (frame["region"] == region).to_numpy()
        segments[("region", region)] = {m: cell_stats(frame[m].to_numpy()[mask], codes[mask]) for m in ("bad", "score")}
    return segments, population


def test_the_report_from_stats_equals_the_report_from_rows():
    frame = rows()
    from_rows = segment_report(frame, segment_fields=["region"], metrics=[BAD, SCORE], intent_field="intent")
    segments, population = stats_of(frame)
    from_stats = segment_report_from_stats(segments, population, metrics=[BAD, SCORE])
    assert len(from_rows.tests) == len(from_stats.tests) == 6
    for a, b in zip(from_rows.tests, from_stats.tests, strict=True):
        assert (a.segment, a.metric, a.n, a.n_rest) == (b.segment, b.metric, b.n, b.n_rest)
        assert a.value == pytest.approx(b.value)
        assert a.value_rest == pytest.approx(b.value_rest)
        assert a.p_value == pytest.approx(b.p_value, rel=1e-9)
        assert a.within_intent.observed == pytest.approx(b.within_intent.observed)
        assert a.within_intent.expected == pytest.approx(b.within_intent.expected)
        assert a.within_intent.p_value == pytest.approx(b.within_intent.p_value, rel=1e-9)
        assert a.p_adjusted == pytest.approx(b.p_adjusted, rel=1e-9)
        assert a.decision == b.decision
        if a.kind == RATE:
            assert a.interval == b.interval
    flagged = [(t.segment, t.metric) for t in from_stats.alerts]
    assert flagged == [("south", "bad")]


def test_one_family_corrects_across_reports():
    frame = rows()
    segments, population = stats_of(frame)
    one = segment_drafts_from_stats(segments, population, metrics=[BAD])
    two = segment_drafts_from_stats(segments, population, metrics=[SCORE])
    joint = adjust_family([one, two])
    alone = segment_report_from_stats(segments, population, metrics=[BAD])
    # Six tests corrected together: each adjusted p is at least the one from three tests.
    for together, single in zip(joint[0].tests, alone.tests, strict=True):
        assert together.p_adjusted >= single.p_adjusted - 1e-12


def test_welch_and_t_interval_from_stats_match_the_rows():
    rng = np.random.default_rng(1)
    a, b = rng.normal(3, 1, 40), rng.normal(3.4, 2, 55)
    sa = CellStats(np.array([a.size]), np.array([a.sum()]), np.array([(a**2).sum()]))
    sb = CellStats(np.array([b.size]), np.array([b.sum()]), np.array([(b**2).sum()]))
    assert welch_test_from_stats(sa, sb) == pytest.approx(mean_test(a, b), rel=1e-9)
    t = t_mean_interval(sa)
    half = 2.0226909 * a.std(ddof=1) / math.sqrt(a.size)  # t(0.975, 39)
    assert (t.low, t.high) == (pytest.approx(a.mean() - half, rel=1e-6), pytest.approx(a.mean() + half, rel=1e-6))


def test_the_histogram_bootstrap_agrees_with_the_row_bootstrap():
    rng = np.random.default_rng(2)
    data = rng.integers(1, 6, size=300).astype(float)
    values, counts = np.unique(data, return_counts=True)
    from_counts = bootstrap_mean_interval_from_counts(values, counts, n_resamples=4000, seed=0)
    from_rows = bootstrap_mean_interval(data, n_resamples=4000, seed=0)
    assert from_counts.method == "bootstrap"
    # Two random streams of the same bootstrap: the ends agree to within its resolution.
    assert from_counts.low == pytest.approx(from_rows.low, abs=0.03)
    assert from_counts.high == pytest.approx(from_rows.high, abs=0.03)
    assert from_counts.low < data.mean() < from_counts.high


def test_disaggregating_cells_equals_disaggregating_rows():
    frame = rows()
    by_rows = disaggregate(frame["bad"], frame["region"], metric="bad", control=frame["intent"])
    cells = frame.groupby(["region", "intent"])["bad"].agg(["mean", "size"]).reset_index()
    by_cells = disaggregate_cells(cells["mean"], cells["size"], cells["region"], metric="bad", control=cells["intent"])
    assert by_cells.overall == pytest.approx(by_rows.overall)
    assert by_cells.counts == by_rows.counts
    for group, value in by_rows.by_group.items():
        assert by_cells.by_group[group] == pytest.approx(value)
    assert by_cells.difference_between_groups == pytest.approx(by_rows.difference_between_groups)
    assert by_cells.ratio_between_groups == pytest.approx(by_rows.ratio_between_groups)
    assert by_cells.difference_to_overall == pytest.approx(by_rows.difference_to_overall)
    assert by_cells.ratio_to_overall == pytest.approx(by_rows.ratio_to_overall)
    assert by_cells.by_control["refund"]["south"] == pytest.approx(by_rows.by_control["refund"]["south"])


def test_the_poisson_bootstrap_of_many_values_agrees_with_the_row_bootstrap():
    rng = np.random.default_rng(4)
    data = np.round(rng.lognormal(6.5, 0.5, size=1500) / 10) * 10  # latencies in 10 ms bins
    values, counts = np.unique(data, return_counts=True)
    assert values.size > 20
    from_counts = bootstrap_mean_interval_from_counts(values, counts, n_resamples=4000, seed=0)
    from_rows = bootstrap_mean_interval(data, n_resamples=4000, seed=0)
    width = from_rows.high - from_rows.low
    assert abs(from_counts.low - from_rows.low) < 0.05 * width
    assert abs(from_counts.high - from_rows.high) < 0.05 * width


def test_coarsening_a_histogram_keeps_rows_and_mean_and_loses_little_spread():
    rng = np.random.default_rng(5)
    data = np.round(rng.lognormal(6.5, 0.5, size=2000) / 10) * 10
    values, counts = np.unique(data, return_counts=True)
    width = 0.25 * data.std()
    merged_values, merged_counts = histogram_coarsen(values, counts, width=width)
    assert merged_values.size < values.size / 3
    assert merged_counts.sum() == counts.sum()
    assert merged_counts @ merged_values / merged_counts.sum() == pytest.approx(data.mean(), rel=1e-12)
    variance = np.cov(np.repeat(merged_values, merged_counts), ddof=0)
    assert data.var() - width**2 / 4 <= variance <= data.var()
    with pytest.raises(ValueError, match="positive width"):
        histogram_coarsen(values, counts, width=0)


def test_the_coarsened_bootstrap_agrees_with_the_row_bootstrap():
    rng = np.random.default_rng(6)
    data = np.round(rng.lognormal(6.5, 0.5, size=1500) / 10) * 10  # latencies in 10 ms bins
    values, counts = np.unique(data, return_counts=True)
    coarse = bootstrap_mean_interval_from_counts(values, counts, n_resamples=8000, seed=0, bin_width_sd=0.25)
    exact = bootstrap_mean_interval_from_counts(values, counts, n_resamples=8000, seed=0)
    from_rows = bootstrap_mean_interval(data, n_resamples=8000, seed=0)
    width = from_rows.high - from_rows.low
    for interval in (coarse, exact):
        assert abs(interval.low - from_rows.low) < 0.04 * width
        assert abs(interval.high - from_rows.high) < 0.04 * width
    assert coarse.high - coarse.low == pytest.approx(width, rel=0.03)
    # Few distinct values are never merged: the same draws as without it.
    few_values, few_counts = np.array([1.0, 2, 3, 4, 5]), np.array([10, 20, 40, 20, 10])
    assert bootstrap_mean_interval_from_counts(few_values, few_counts, bin_width_sd=0.25) == (
        bootstrap_mean_interval_from_counts(few_values, few_counts)
    )


@pytest.mark.parametrize("seed", range(5))
def test_the_closed_form_g_test_equals_scipys(seed):
    from scipy import stats

    rng = np.random.default_rng(seed)
    for _ in range(40):
        n, n_rest = int(rng.integers(1, 400)), int(rng.integers(1, 4000))
        k, k_rest = int(rng.integers(0, n + 1)), int(rng.integers(0, n_rest + 1))
        table = np.array([[k, n - k], [k_rest, n_rest - k_rest]], dtype=float)
        if table[:, 0].sum() == 0 or table[:, 1].sum() == 0:
            assert rate_test(k, n, k_rest, n_rest) == 1.0
            continue
        _, expected, _, _ = stats.chi2_contingency(table, correction=False, lambda_="log-likelihood")
        assert rate_test(k, n, k_rest, n_rest) == pytest.approx(expected, rel=1e-9, abs=1e-300)
