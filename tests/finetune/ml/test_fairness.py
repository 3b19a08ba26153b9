"""Bias-monitoring statistics (plain Python): figures against hand computation, and the alert rule."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from finetune.ml.fairness import (
    HIGHER,
    LOWER,
    MEAN,
    RATE,
    AlertThresholds,
    Metric,
    alert_decision,
    benjamini_hochberg,
    bootstrap_mean_interval,
    disaggregate,
    favourable_ratio,
    mean_test,
    rate_test,
    relative_gap,
    segment_report,
    wilson_interval,
    within_intent_comparison,
)

BAD = Metric("bad", RATE, LOWER)
SCORE = Metric("score", MEAN, HIGHER)

# --- intervals -------------------------------------------------------------------------


def test_wilson_interval_matches_published_values():
    # Newcombe (1998), Table I: 8/20 -> 0.2188-0.6134; 0/10 -> 0-0.2775.
    eight = wilson_interval(8, 20)
    assert (eight.low, eight.high) == pytest.approx((0.2188, 0.6134), abs=1e-4)
    zero = wilson_interval(0, 10)
    assert (zero.low, zero.high) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert math.isnan(wilson_interval(0, 0).low)
    with pytest.raises(ValueError, match="successes <= n"):
        wilson_interval(5, 3)


def test_bootstrap_interval_by_hand_and_reproducible():
    # Two values 0 and 10: a resampled mean is 0, 5 or 10 with chances 1/4, 1/2, 1/4,
    # so the 2.5% and 97.5% quantiles of 2,000 resamples are 0 and 10.
    interval = bootstrap_mean_interval([0, 10], seed=1)
    assert (interval.low, interval.high) == (0.0, 10.0)
    values = np.random.default_rng(3).exponential(2.0, size=200)
    first = bootstrap_mean_interval(values, seed=7)
    assert first == bootstrap_mean_interval(values, seed=7)
    assert first.low < values.mean() < first.high
    # Close to the t interval for n=200 (CLT), but not identical (skewed data).
    half = stats.t.ppf(0.975, 199) * values.std(ddof=1) / math.sqrt(200)
    assert first.low == pytest.approx(values.mean() - half, abs=0.1)
    assert bootstrap_mean_interval([4, 4, 4]) == bootstrap_mean_interval([4])
    assert bootstrap_mean_interval([4]).low == 4
    big = bootstrap_mean_interval(values, max_n=100)
    assert big.method == "normal"
    assert big.low == pytest.approx(values.mean() - half)


# --- tests -----------------------------------------------------------------------------


def test_g_test_by_hand():
    # [[10, 10], [5, 25]]: expected counts 6, 14, 9, 21; G = 2 sum O ln(O/E), 1 degree of freedom.
    g = 2 * (10 * math.log(10 / 6) + 10 * math.log(10 / 14) + 5 * math.log(5 / 9) + 25 * math.log(25 / 21))
    assert rate_test(10, 20, 5, 30) == pytest.approx(math.erfc(math.sqrt(g / 2)))
    assert rate_test(0, 20, 0, 30) == 1.0
    assert rate_test(3, 20, 0, 0) == 1.0


def test_welch_test_by_hand():
    a, b = [1, 2, 3, 4], [2, 4, 6, 8, 10]
    va, vb = np.var(a, ddof=1) / 4, np.var(b, ddof=1) / 5
    t = (np.mean(a) - np.mean(b)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / 3 + vb**2 / 4)
    assert mean_test(a, b) == pytest.approx(2 * stats.t.sf(abs(t), df))
    assert mean_test([1], b) == 1.0
    assert mean_test([2, 2], [2, 2, 2]) == 1.0
    assert mean_test([2, 2], [3, 3, 3]) == 0.0


def test_benjamini_hochberg_by_hand():
    # Sorted 0.01, 0.03, 0.04, 0.2 times m/rank: 0.04, 0.06, 0.0533, 0.2; then the running minimum from the top.
    assert benjamini_hochberg([0.01, 0.04, 0.03, 0.2]) == pytest.approx([0.04, 0.16 / 3, 0.16 / 3, 0.2])
    assert benjamini_hochberg([]) == []


# --- the alert rule --------------------------------------------------------------------


def test_materiality_measures():
    assert relative_gap(0.105, 0.1) == pytest.approx(0.05)
    assert relative_gap(0.0, 0.0) == 0
    assert relative_gap(0.1, 0.0) == math.inf
    # A bad-rating rate: the four-fifths ratio is on the good-rating rate.
    assert favourable_ratio(0.3, 0.1, kind=RATE, better=LOWER) == pytest.approx(0.7 / 0.9)
    assert favourable_ratio(3.0, 4.0, kind=MEAN, better=HIGHER) == 0.75


@pytest.mark.parametrize(
    ("n", "p_adjusted", "value", "expected", "reason"),
    [
        (100, 0.001, 0.30, True, "against this segment"),
        (10, 0.001, 0.30, False, "below the minimum"),
        (100, 0.2, 0.30, False, "not significant"),
        (100, 0.001, 0.102, False, "not material"),
        (100, 0.001, 0.02, False, "in the customer's favour"),
    ],
)
def test_alert_decision_needs_every_condition(n, p_adjusted, value, expected, reason):
    decision = alert_decision(n=n, p_adjusted=p_adjusted, value=value, reference=0.1, kind=RATE, better=LOWER)
    assert decision.alert is expected
    assert reason in decision.reason


def test_thresholds_are_passed_in():
    strict = AlertThresholds(min_n=200)
    decision = alert_decision(
        n=100, p_adjusted=0.001, value=0.3, reference=0.1, kind=RATE, better=LOWER, thresholds=strict
    )
    assert not decision.alert
    assert not decision.enough_data


# --- fixtures of rated replies ---------------------------------------------------------


def rows_for(groups: dict[tuple[str, str], tuple[int, int]], *, scores: dict | None = None) -> list[dict]:
    """Rows from exact counts: (register, intent) -> (replies, bad replies). Score 5 for good, 2 for bad."""
    rows = []
    for (register, intent), (n, bad) in groups.items():
        for i in range(n):
            is_bad = i < bad
            rows.append(
                {
                    "registers": [register],
                    "intent": intent,
                    "bad": int(is_bad),
                    "score": (scores or {}).get((register, is_bad), 2.0 if is_bad else 5.0),
                }
            )
    return rows


def report_for(rows, **kwargs):
    return segment_report(rows, segment_fields=["registers"], metrics=[BAD, SCORE], **kwargs)


def find(report, segment, metric):
    return next(t for t in report.tests if t.segment == segment and t.metric == metric)


def test_alert_fires_on_a_real_disparity():
    # Same intent mix; colloquial customers get 40% bad replies, plain ones 10%.
    rows = rows_for(
        {
            ("colloquial", "refund"): (30, 12),
            ("colloquial", "delivery"): (30, 12),
            ("plain", "refund"): (70, 7),
            ("plain", "delivery"): (70, 7),
        }
    )
    report = report_for(rows)
    bad = find(report, "colloquial", "bad")
    assert bad.n == 60
    assert bad.value == pytest.approx(0.4)
    assert bad.value_rest == pytest.approx(0.1)
    assert bad.within_intent.expected == pytest.approx(0.1)
    assert bad.within_intent.difference == pytest.approx(0.3)
    assert bad.alert
    assert bad.decision.direction == "worse"
    assert find(report, "colloquial", "score").alert
    # The other side of the same gap is in plain customers' favour: no alert for them.
    assert not find(report, "plain", "bad").alert
    assert {(t.segment, t.metric) for t in report.alerts} == {("colloquial", "bad"), ("colloquial", "score")}


def test_no_alert_when_service_is_even():
    rows = rows_for(
        {
            ("colloquial", "refund"): (30, 3),
            ("colloquial", "delivery"): (30, 3),
            ("plain", "refund"): (70, 7),
            ("plain", "delivery"): (70, 7),
        }
    )
    report = report_for(rows)
    assert report.alerts == []
    assert find(report, "colloquial", "bad").p_value == pytest.approx(1.0)


def test_no_alert_on_small_n_however_large_the_gap():
    rows = rows_for(
        {
            ("offensive", "refund"): (5, 5),
            ("offensive", "delivery"): (5, 5),
            ("plain", "refund"): (100, 5),
            ("plain", "delivery"): (100, 5),
        }
    )
    bad = find(report_for(rows), "offensive", "bad")
    assert bad.value == 1.0
    assert bad.p_value < 1e-6
    assert not bad.alert
    assert "below the minimum" in bad.decision.reason


def test_a_segment_that_asks_harder_questions_is_not_flagged():
    # Everyone gets 40% bad replies on complaints and 5% on tracking; keyword-only
    # customers ask mostly complaints, so their raw bad rate is far higher.
    rows = rows_for(
        {
            ("keyword_only", "complaint"): (80, 32),
            ("keyword_only", "track_order"): (20, 1),
            ("plain", "complaint"): (40, 16),
            ("plain", "track_order"): (160, 8),
        }
    )
    bad = find(report_for(rows), "keyword_only", "bad")
    assert bad.value == pytest.approx(0.33)
    assert bad.value_rest == pytest.approx(0.12)
    assert bad.p_value < 1e-4  # the raw comparison would call it biased
    assert bad.within_intent.difference == pytest.approx(0.0)
    assert bad.within_intent.p_value == pytest.approx(1.0)
    assert bad.decision_basis == "within-intent"
    assert not bad.alert
    # Without intent as a control the same data raises an alert.
    assert find(report_for(rows, intent_field=None), "keyword_only", "bad").alert


def test_cmh_and_standardised_rates_by_hand():
    # Two intents: A segment 3/10 bad vs rest 2/20; B segment 1/5 vs rest 4/40.
    values, in_segment, intents = [], [], []
    for intent, n_seg, bad_seg, n_rest, bad_rest in (("A", 10, 3, 20, 2), ("B", 5, 1, 40, 4)):
        for n, bad, flag in ((n_seg, bad_seg, True), (n_rest, bad_rest, False)):
            values += [1] * bad + [0] * (n - bad)
            in_segment += [flag] * n
            intents += [intent] * n
    result = within_intent_comparison(values, in_segment, intents, kind=RATE)
    # Weights are the segment's mix: 10/15 and 5/15.
    assert result.observed == pytest.approx(10 / 15 * 0.3 + 5 / 15 * 0.2)
    assert result.expected == pytest.approx(10 / 15 * 0.1 + 5 / 15 * 0.1)
    # CMH: sum(a - E[a]) over strata, E[a] = n_seg * successes / total, variance per stratum.
    e_a = 10 * 5 / 30
    e_b = 5 * 5 / 45
    v_a = 10 * 20 * 5 * 25 / (30**2 * 29)
    v_b = 5 * 40 * 5 * 40 / (45**2 * 44)
    statistic = (abs((3 - e_a) + (1 - e_b)) - 0.5) ** 2 / (v_a + v_b)
    assert result.p_value == pytest.approx(stats.chi2.sf(statistic, 1))
    assert result.test == "cmh"
    assert result.strata == 2
    assert result.coverage == 1.0


def test_stratified_mean_difference_by_hand():
    values = [4, 5, 3, 4, 5, 5, 1, 2, 2, 3]
    in_segment = [True, True, False, False, False, False, True, False, False, False]
    intents = ["A", "A", "A", "A", "A", "A", "B", "B", "B", "C"]  # C: no segment rows, left out
    result = within_intent_comparison(values, in_segment, intents, kind=MEAN)
    # A: segment mean 4.5 (var 0.5, n 2) vs rest 4.25 (var 0.9167, n 4); B: segment 1 (n 1) vs rest 2 (var 0, n 2).
    pooled = np.var(values, ddof=1)  # the metric's variance over all rows stands in for B's one-row side
    w_a, w_b = 2 / 3, 1 / 3
    assert result.difference == pytest.approx(w_a * 0.25 + w_b * -1.0)
    se = math.sqrt(w_a**2 * (0.5 / 2 + np.var([3, 4, 5, 5], ddof=1) / 4) + w_b**2 * (pooled / 1 + 0 / 2))
    assert result.p_value == pytest.approx(2 * stats.norm.sf(abs(result.difference) / se))
    assert result.strata == 2
    assert result.coverage == 1.0


def test_within_intent_needs_shared_intents():
    assert within_intent_comparison([1, 0], [True, False], ["A", "B"], kind=RATE) is None


# --- disaggregation --------------------------------------------------------------------


def test_disaggregate_with_metric_frame_by_hand():
    values = [1, 0, 1, 1, 0, 0, 1]
    groups = ["a", "a", "b", "b", "b", "c", "c"]
    result = disaggregate(values, groups, metric="helpful", control=["x", "y", "x", "x", "y", "x", "y"])
    assert result.overall == pytest.approx(4 / 7)
    assert result.by_group == pytest.approx({"a": 0.5, "b": 2 / 3, "c": 0.5})
    assert result.counts == {"a": 2, "b": 3, "c": 2}
    assert result.difference_between_groups == pytest.approx(2 / 3 - 0.5)
    assert result.ratio_between_groups == pytest.approx(0.75)
    # The group furthest from the overall 4/7 is b (2/3 - 4/7 > 4/7 - 1/2), in both measures.
    assert result.difference_to_overall == pytest.approx(2 / 3 - 4 / 7)
    assert result.ratio_to_overall == pytest.approx((4 / 7) / (2 / 3))
    assert result.by_control == {"x": {"a": 1.0, "b": 1.0, "c": 0.0}, "y": {"a": 0.0, "b": 0.0, "c": 1.0}}
    with pytest.raises(ValueError, match="no values"):
        disaggregate([float("nan")], ["a"])


# --- the report ------------------------------------------------------------------------


def test_report_corrects_across_every_segment_and_metric_and_serialises():
    rows = rows_for(
        {
            ("colloquial", "refund"): (30, 12),
            ("colloquial", "delivery"): (30, 12),
            ("plain", "refund"): (70, 7),
            ("plain", "delivery"): (70, 7),
        }
    )
    rows[0]["registers"] = ["colloquial", "typos"]  # multi-label cells
    rows[1]["score"] = None  # an unrated score: left out of that metric only
    report = report_for(rows)
    assert {t.segment for t in report.tests} == {"colloquial", "typos", "plain"}
    decision_p = [t.within_intent.p_value if t.within_intent else t.p_value for t in report.tests]
    assert [t.p_adjusted for t in report.tests] == pytest.approx(benjamini_hochberg(decision_p))
    assert find(report, "colloquial", "score").n == 59
    payload = report.to_dict()
    assert json.loads(json.dumps(payload))["tests"][0]["interval"]["method"] in {"wilson", "bootstrap"}
    assert payload["thresholds"]["min_n"] == 20


def test_report_rejects_bad_input_clearly():
    with pytest.raises(ValueError, match="no column"):
        segment_report([{"registers": ["plain"], "bad": 1}], segment_fields=["registers"], metrics=[BAD])
    with pytest.raises(ValueError, match="values must be 0 or 1"):
        segment_report(
            [{"registers": ["a"], "bad": 2, "intent": "x"}, {"registers": ["b"], "bad": 0, "intent": "x"}],
            segment_fields=["registers"],
            metrics=[BAD],
        )
    with pytest.raises(ValueError, match="kind must be"):
        Metric("x", "median", None)
