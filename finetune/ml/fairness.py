"""Statistics for bias monitoring: intervals, segment-against-rest tests, the alert rule.

Plain Python over numpy, pandas, scipy and fairlearn; no Django. The monitoring
dashboard (and the counterfactual probes, ``ml/probes.py``) feed it one row per
rated bot reply and present what it returns.

What it computes, and why these methods (docs/bias-monitoring.md says more):

- **Intervals** (95% by default). Rates get the Wilson score interval
  (:func:`wilson_interval`): unlike the normal "p ± 1.96·se" it stays inside
  [0, 1] and keeps close to its nominal coverage for small n and rates near 0 or
  1, which is where a segment's bad-rating rate lives. Means (scores, reply
  length, latency) get a seeded percentile bootstrap (:func:`bootstrap_mean_interval`):
  no normality assumption for skewed latencies or 1-5 scores.
- **Segment against the rest**: for a rate, a G-test (log-likelihood ratio) on
  the 2x2 table segment/rest x outcome (:func:`rate_test`); for a mean, Welch's
  t-test (:func:`mean_test`), which does not assume equal variances.
- **Many tests at once**: every segment x metric test of one report is one
  family, corrected with Benjamini-Hochberg (:func:`benjamini_hochberg`), which
  controls the false discovery rate: with 10 segments and 10 metrics, 100
  uncorrected tests at 5% would raise about 5 false alerts every time.
- **Intent as a control** (:func:`within_intent_comparison`): a segment that
  asks harder questions gets worse ratings without being served worse. The
  segment is compared with the rest *within each intent*, and the per-intent
  gaps are averaged with the segment's own intent mix as weights (indirect
  standardisation; in causal terms the effect on the segment, the ATT): the
  "expected" value is what the segment would get if each of its questions were
  answered as well as the rest's questions of the same intent. Its test is the
  Cochran-Mantel-Haenszel test for rates and a stratified z-test for means.
- **The alert rule** (:func:`alert_decision`): a segment is flagged only when
  it has enough data (``n >= min_n``), its corrected test is significant, the
  gap is material (relative gap above ``min_relative_gap``, or the
  four-fifths ratio outside ``[ratio_low, ratio_high]``), and the gap is in the
  metric's bad direction. Significance alone flags trivial gaps on big data;
  a big gap alone flags noise on small data.
- **Disaggregation** (:func:`disaggregate`): fairlearn's ``MetricFrame``
  gives the overall value, the value by group, and the largest difference and
  smallest ratio between groups and to the overall value.

The entry point the dashboard calls is :func:`segment_report`.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

import numpy as np
import pandas as pd
from scipy import stats

RATE = "rate"
MEAN = "mean"
HIGHER = "higher"
LOWER = "lower"

Kind = Literal["rate", "mean"]
Better = Literal["higher", "lower"] | None

DEFAULT_CONFIDENCE = 0.95
DEFAULT_RESAMPLES = 2000  # percentile-interval ends move by < 0.01 se between seeds at 2,000
# Above this many values a mean's interval is the t interval (see bootstrap_mean_interval).
BOOTSTRAP_MAX_N = 5000
RESAMPLE_CHUNK = 2_000_000  # indices drawn at once: bounds the bootstrap's memory to ~16 MB
# The histogram bootstrap draws Poisson counts above this many distinct values and rows
# (below, the exact multinomial: a resample of 50 rows may differ in size noticeably).
POISSON_MIN_VALUES = 20
POISSON_MIN_N = 50


# --- intervals -------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _z(confidence: float) -> float:
    """The two-sided normal quantile (1.96 at 95%); cached: scipy's ppf costs ~0.1 ms a call."""
    return float(stats.norm.ppf(0.5 + confidence / 2))


@functools.lru_cache(maxsize=8192)
def _t(confidence: float, df: int) -> float:
    """The two-sided t quantile with ``df`` degrees of freedom, cached as :func:`_z`."""
    return float(stats.t.ppf(0.5 + confidence / 2, df=df))


def _chi2_1_sf(statistic: float) -> float:
    """P(chi-squared with one degree of freedom > statistic), i.e. ``stats.chi2.sf(x, 1)``, in closed form."""
    return math.erfc(math.sqrt(max(statistic, 0.0) / 2))


@dataclass(frozen=True)
class Interval:
    low: float
    high: float
    method: str  # "wilson", "bootstrap", "normal" or "none" (no data)


def wilson_interval(successes: int, n: int, *, confidence: float = DEFAULT_CONFIDENCE) -> Interval:
    """Wilson score interval for the rate ``successes / n``; (nan, nan) when n is 0."""
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"wilson_interval needs 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return Interval(math.nan, math.nan, "none")
    z = _z(confidence)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return Interval(max(0.0, centre - half), min(1.0, centre + half), "wilson")


def bootstrap_mean_interval(
    values: Sequence[float] | np.ndarray,
    *,
    confidence: float = DEFAULT_CONFIDENCE,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    max_n: int | None = None,
) -> Interval:
    """Percentile bootstrap interval of the mean, reproducible for a given ``seed``.

    Costs ``n_resamples x len(values)`` random draws, drawn in chunks so memory stays
    bounded; one value gives a zero-width interval, none gives (nan, nan). Above
    ``max_n`` values the t interval is returned instead (``method="normal"``): there
    the mean's sampling distribution is normal to within what a bootstrap resolves,
    and resampling 100,000 latencies 2,000 times would cost seconds per cell.
    """
    data = np.asarray(values, dtype=float)
    n = data.size
    if n == 0:
        return Interval(math.nan, math.nan, "none")
    if n == 1 or np.all(data == data[0]):
        return Interval(float(data[0]), float(data[0]), "bootstrap")
    if max_n is not None and n > max_n:
        half = _t(confidence, n - 1) * data.std(ddof=1) / math.sqrt(n)
        return Interval(float(data.mean() - half), float(data.mean() + half), "normal")
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    per_chunk = max(1, RESAMPLE_CHUNK // n)
    for start in range(0, n_resamples, per_chunk):
        stop = min(n_resamples, start + per_chunk)
        means[start:stop] = data[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    alpha = 1 - confidence
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return Interval(float(low), float(high), "bootstrap")


# --- tests -----------------------------------------------------------------------------


def rate_test(successes: int, n: int, successes_rest: int, n_rest: int) -> float:
    """G-test p-value that a segment's rate equals the rest's (2x2 table, no continuity correction).

    1.0 when either side is empty or the outcome never (or always) happens: no evidence.
    The same as ``scipy.stats.chi2_contingency(table, correction=False,
    lambda_="log-likelihood")``, in closed form (a dashboard runs hundreds; scipy's
    costs ~1 ms each): G = 2 sum O ln(O / E) over the non-empty cells, one degree of freedom.
    """
    table = np.array([[successes, n - successes], [successes_rest, n_rest - successes_rest]], dtype=float)
    if n == 0 or n_rest == 0 or table[:, 0].sum() == 0 or table[:, 1].sum() == 0:
        return 1.0
    expected = np.outer(table.sum(axis=1), table.sum(axis=0)) / table.sum()
    seen = table > 0
    g = 2.0 * float(np.sum(table[seen] * np.log(table[seen] / expected[seen])))
    return _chi2_1_sf(g)


def mean_test(values: Sequence[float] | np.ndarray, rest: Sequence[float] | np.ndarray) -> float:
    """Welch's t-test p-value that two means are equal (no equal-variance assumption).

    With fewer than two values on a side there is no variance to test with: 1.0. Two
    constant samples are different for certain when their values differ (0.0).
    """
    a = np.asarray(values, dtype=float)
    b = np.asarray(rest, dtype=float)
    if a.size < 2 or b.size < 2:
        return 1.0
    if a.var() == 0 and b.var() == 0:
        return 1.0 if a[0] == b[0] else 0.0
    with warnings.catch_warnings():  # scipy warns of precision loss when one side is constant
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def benjamini_hochberg(p_values: Sequence[float]) -> list[float]:
    """Benjamini-Hochberg adjusted p-values (compare each with the false discovery rate)."""
    if len(p_values) == 0:
        return []
    return [float(p) for p in stats.false_discovery_control(np.asarray(p_values, dtype=float), method="bh")]


# --- the alert rule --------------------------------------------------------------------


@dataclass(frozen=True)
class AlertThresholds:
    """When a gap becomes an alert. Phase B reads these from settings; the defaults are the issue's."""

    min_n: int = 20  # fewer replies than this in a segment: greyed out, never alerted
    alpha: float = 0.05  # Benjamini-Hochberg false discovery rate across one report's tests
    min_relative_gap: float = 0.05  # |segment - rest| / |rest| above this is material
    ratio_low: float = 0.8  # the four-fifths rule, on the favourable outcome's rate...
    ratio_high: float = 1.25  # ...and its reciprocal


def relative_gap(value: float, reference: float) -> float:
    """|value - reference| / |reference|; inf when the reference is 0 and the value is not."""
    if reference == 0:
        return 0.0 if value == 0 else math.inf
    return abs(value - reference) / abs(reference)


def favourable_ratio(value: float, reference: float, *, kind: Kind, better: Better) -> float:
    """The four-fifths ratio: segment over rest, on the outcome that is good for the customer.

    For a rate where lower is better (bad-rating rate) that is the good-rating rate,
    ``(1 - value) / (1 - reference)``; otherwise the values themselves.
    """
    if kind == RATE and better == LOWER:
        value, reference = 1 - value, 1 - reference
    if reference == 0:
        return 1.0 if value == 0 else math.inf
    return value / reference


def direction(value: float, reference: float, better: Better) -> str:
    """ "worse", "better" or "different" (a metric with no good direction), or "same"."""
    if value == reference or any(math.isnan(x) for x in (value, reference)):
        return "same"
    if better is None:
        return "different"
    return "worse" if (value < reference) == (better == HIGHER) else "better"


def is_material(value: float, reference: float, *, kind: Kind, better: Better, thresholds: AlertThresholds) -> bool:
    ratio = favourable_ratio(value, reference, kind=kind, better=better)
    return relative_gap(value, reference) > thresholds.min_relative_gap or not (
        thresholds.ratio_low <= ratio <= thresholds.ratio_high
    )


@dataclass(frozen=True)
class AlertDecision:
    enough_data: bool
    significant: bool
    material: bool
    direction: str
    alert: bool
    reason: str  # why it did or did not fire, for the page's tooltip


def alert_decision(
    *,
    n: int,
    p_adjusted: float,
    value: float,
    reference: float,
    kind: Kind,
    better: Better,
    thresholds: AlertThresholds = AlertThresholds(),  # noqa: B008 (frozen, so a shared default is safe)
) -> AlertDecision:
    """The alert rule: enough data AND significant after correction AND material AND in the bad direction."""
    enough = n >= thresholds.min_n
    significant = p_adjusted < thresholds.alpha
    material = is_material(value, reference, kind=kind, better=better, thresholds=thresholds)
    way = direction(value, reference, better)
    harmful = way in ("worse", "different")
    alert = enough and significant and material and harmful
    if not enough:
        reason = f"n={n} is below the minimum of {thresholds.min_n}"
    elif not significant:
        reason = f"not significant after correction (p={p_adjusted:.3g}, alpha={thresholds.alpha})"
    elif not material:
        reason = "significant but not material (gap within the thresholds)"
    elif not harmful:
        reason = "significant and material, but in the customer's favour"
    else:
        reason = "significant and material gap against this segment"
    return AlertDecision(enough, significant, material, way, alert, reason)


# --- intent as a control ---------------------------------------------------------------


@dataclass(frozen=True)
class WithinIntent:
    """The segment against the rest within each intent, weighted by the segment's intent mix.

    ``observed`` is the segment's value over the intents both sides have; ``expected``
    is what the rest gets on the same intents, weighted like the segment's questions.
    ``coverage`` is the share of the segment's rows in such intents.
    """

    observed: float
    expected: float
    difference: float
    interval: Interval  # of the difference (normal approximation)
    p_value: float
    test: str  # "cmh" or "stratified-z"
    strata: int
    coverage: float


def within_intent_comparison(
    values: Sequence[float] | np.ndarray,
    in_segment: Sequence[bool] | np.ndarray,
    intents: Sequence[str] | np.ndarray,
    *,
    kind: Kind,
    confidence: float = DEFAULT_CONFIDENCE,
) -> WithinIntent | None:
    """Compare a segment with the rest within intent (indirect standardisation); None when no
    intent has rows on both sides.

    Per intent k with ``n_k`` segment rows: the gap ``d_k = mean_segment_k - mean_rest_k``;
    the summary ``D = sum_k w_k d_k`` with ``w_k = n_k / sum n_k`` (the segment's own
    intent mix), so an intent the segment rarely asks about counts little however
    the rest fares there. ``Var(D) = sum_k w_k^2 (s2_seg_k / n_seg_k + s2_rest_k / n_rest_k)``.

    The p-value: for rates the Cochran-Mantel-Haenszel test (with continuity
    correction), the standard test of "no association within any stratum" that
    copes with small strata; for means a z-test of ``D / se(D)``, where a stratum's
    variance on a side with one row is the metric's pooled variance.
    """
    data = np.asarray(values, dtype=float)
    all_codes, uniques = pd.factorize(np.asarray(intents, dtype=object))
    usable = ~np.isnan(data) & (all_codes >= 0)  # rows with a value and an intent
    return _within_intent(
        data[usable], np.asarray(in_segment, dtype=bool)[usable], all_codes[usable], len(uniques), kind, confidence
    )


def _within_intent(
    data: np.ndarray, mask: np.ndarray, codes: np.ndarray, n_codes: int, kind: Kind, confidence: float
) -> WithinIntent | None:
    """within_intent_comparison on factorised intents (no missing values): counts and sums
    per intent and side by ``np.bincount``, so a report over 100,000 rows stays fast."""
    if n_codes == 0:
        return None

    def per_intent(side: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        count = np.bincount(codes[side], minlength=n_codes).astype(float)
        total = np.bincount(codes[side], weights=data[side], minlength=n_codes)
        squares = np.bincount(codes[side], weights=data[side] ** 2, minlength=n_codes)
        return count, total, squares

    pooled = float(data.var(ddof=1)) if data.size > 1 else 0.0
    return _within_intent_stats(*per_intent(mask), *per_intent(~mask), kind, confidence, pooled)


def _within_intent_stats(
    n_seg_all: np.ndarray,
    x_seg_all: np.ndarray,
    sq_seg_all: np.ndarray,
    n_rest_all: np.ndarray,
    x_rest_all: np.ndarray,
    sq_rest_all: np.ndarray,
    kind: Kind,
    confidence: float,
    pooled: float,
) -> WithinIntent | None:
    """The within-intent comparison from counts, sums and sums of squares per intent and side
    (what a database aggregation returns); ``pooled`` is the metric's variance over all rows."""
    shared = (n_seg_all > 0) & (n_rest_all > 0)
    if not shared.any():
        return None
    n_seg, x_seg, sq_seg = n_seg_all[shared], x_seg_all[shared], sq_seg_all[shared]
    n_rest, x_rest, sq_rest = n_rest_all[shared], x_rest_all[shared], sq_rest_all[shared]
    mean_seg, mean_rest = x_seg / n_seg, x_rest / n_rest
    weights = n_seg / n_seg.sum()
    observed = float(weights @ mean_seg)
    expected = float(weights @ mean_rest)
    difference = observed - expected
    if kind == RATE:
        # Half a success and half a failure added per cell, so a stratum at 0% or 100%
        # still carries variance in the interval (the CMH p-value needs no such help).
        p_seg = (x_seg + 0.5) / (n_seg + 1)
        p_rest = (x_rest + 0.5) / (n_rest + 1)
        var_seg, var_rest = p_seg * (1 - p_seg), p_rest * (1 - p_rest)
        p_value = _cmh_p_value(x_seg, n_seg, x_rest, n_rest)
        test = "cmh"
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            var_seg = np.where(n_seg > 1, (sq_seg - n_seg * mean_seg**2) / (n_seg - 1), pooled)
            var_rest = np.where(n_rest > 1, (sq_rest - n_rest * mean_rest**2) / (n_rest - 1), pooled)
        var_seg, var_rest = np.maximum(var_seg, 0.0), np.maximum(var_rest, 0.0)  # rounding below zero
        test = "stratified-z"
    se = math.sqrt(float(np.sum(weights**2 * (var_seg / n_seg + var_rest / n_rest))))
    if kind != RATE:
        if se > 0:
            p_value = math.erfc(abs(difference) / se / math.sqrt(2))  # 2 * P(Z > |d| / se)
        else:
            p_value = 1.0 if difference == 0 else 0.0
    z = _z(confidence)
    total_segment = float(n_seg_all.sum())
    return WithinIntent(
        observed=observed,
        expected=expected,
        difference=difference,
        interval=Interval(difference - z * se, difference + z * se, "normal"),
        p_value=p_value,
        test=test,
        strata=int(shared.sum()),
        coverage=float(n_seg.sum() / total_segment) if total_segment else 0.0,
    )


def _cmh_p_value(x_seg: np.ndarray, n_seg: np.ndarray, x_rest: np.ndarray, n_rest: np.ndarray) -> float:
    """Cochran-Mantel-Haenszel test over 2x2 tables [[x_seg, n_seg - x_seg], [x_rest, n_rest - x_rest]]."""
    total = n_seg + n_rest
    successes = x_seg + x_rest
    usable = total > 1
    expected = n_seg * successes / total
    variance = np.zeros_like(total)
    variance[usable] = (n_seg[usable] * n_rest[usable] * successes[usable] * (total[usable] - successes[usable])) / (
        total[usable] ** 2 * (total[usable] - 1)
    )
    if variance.sum() <= 0:
        return 1.0
    statistic = (max(abs(float(np.sum(x_seg[usable] - expected[usable]))) - 0.5, 0.0)) ** 2 / float(variance.sum())
    return _chi2_1_sf(statistic)


# --- disaggregation (fairlearn) --------------------------------------------------------


@dataclass(frozen=True)
class Disaggregation:
    """A metric overall and by group (fairlearn MetricFrame), with differences and ratios."""

    metric: str
    overall: float
    by_group: dict[str, float]
    counts: dict[str, int]
    difference_between_groups: float  # largest group value minus smallest
    ratio_between_groups: float  # smallest over largest
    difference_to_overall: float  # largest |group - overall|
    ratio_to_overall: float  # smallest of group/overall and overall/group
    by_control: dict[str, dict[str, float]] = field(default_factory=dict)  # control level -> group -> value


def _mean_metric(y_true, y_pred) -> float:  # MetricFrame's signature; y_pred repeats y_true
    return float(np.mean(y_true)) if len(y_true) else math.nan


def _count_metric(y_true, y_pred) -> int:
    return len(y_true)


def disaggregate(
    values: Sequence[float] | np.ndarray,
    groups: Sequence[str] | np.ndarray,
    *,
    metric: str = "value",
    control: Sequence[str] | np.ndarray | None = None,
) -> Disaggregation:
    """Disaggregate a per-row metric (0/1 for a rate) by group with fairlearn's MetricFrame.

    The metric is an observed outcome, not a prediction, so MetricFrame gets it as both
    ``y_true`` and ``y_pred`` and the metric function reads ``y_true``. With ``control``
    (the intent), ``by_control`` holds the value by group within each control level.
    Rows whose value is missing are left out.
    """
    from fairlearn.metrics import MetricFrame

    data = pd.DataFrame({"value": np.asarray(values, dtype=float), "group": np.asarray(groups, dtype=object)})
    if control is not None:
        data["control"] = np.asarray(control, dtype=object)
    data = data.dropna(subset=["value"])
    if data.empty:
        raise ValueError(f"disaggregate: no values for metric {metric!r}")
    frame = MetricFrame(
        metrics={"value": _mean_metric, "n": _count_metric},
        y_true=data["value"].to_numpy(),
        y_pred=data["value"].to_numpy(),
        sensitive_features=data["group"].astype(str).rename("group"),
    )
    by_group = frame.by_group
    result = Disaggregation(
        metric=metric,
        overall=float(frame.overall["value"]),
        by_group={str(k): float(v) for k, v in by_group["value"].items()},
        counts={str(k): int(v) for k, v in by_group["n"].items()},
        difference_between_groups=float(frame.difference(method="between_groups")["value"]),
        ratio_between_groups=float(frame.ratio(method="between_groups")["value"]),
        difference_to_overall=float(frame.difference(method="to_overall")["value"]),
        ratio_to_overall=float(frame.ratio(method="to_overall")["value"]),
    )
    if control is not None:
        with warnings.catch_warnings():  # a group absent from one intent is NaN there, which is the point
            warnings.simplefilter("ignore", RuntimeWarning)
            controlled = MetricFrame(
                metrics=_mean_metric,
                y_true=data["value"].to_numpy(),
                y_pred=data["value"].to_numpy(),
                sensitive_features=data["group"].astype(str).rename("group"),
                control_features=data["control"].astype(str).rename("control"),
            ).by_group
        by_control: dict[str, dict[str, float]] = {}
        for (level, group), value in controlled.items():
            if not pd.isna(value):
                by_control.setdefault(str(level), {})[str(group)] = float(value)
        result = Disaggregation(**{**asdict(result), "by_control": by_control})
    return result


# --- the report ------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    """A per-reply outcome: a 0/1 ``rate`` (bad rating, handoff) or a ``mean`` (score, latency)."""

    name: str  # the row field that holds it; a missing value (None/NaN) leaves the row out
    kind: Kind
    better: Better  # HIGHER, LOWER, or None when neither way is good for the customer
    label: str = ""

    def __post_init__(self) -> None:
        if self.kind not in (RATE, MEAN):
            raise ValueError(f"Metric {self.name!r}: kind must be 'rate' or 'mean', not {self.kind!r}")
        if self.better not in (HIGHER, LOWER, None):
            raise ValueError(f"Metric {self.name!r}: better must be 'higher', 'lower' or None, not {self.better!r}")


@dataclass(frozen=True)
class SegmentTest:
    """One segment against the rest on one metric, with the alert decision."""

    field: str  # the segment dimension: "register", "language", "page_segment", ...
    segment: str
    metric: str
    kind: str
    better: str | None
    n: int
    n_rest: int
    value: float
    value_rest: float
    interval: Interval
    interval_rest: Interval
    difference: float  # value - value_rest
    relative_gap: float
    ratio: float  # the four-fifths ratio (favourable outcome, segment over rest)
    test: str  # "g-test" or "welch"
    p_value: float
    within_intent: WithinIntent | None
    # What the decision uses: the within-intent comparison when there is one, else the raw one.
    decision_basis: str  # "within-intent" or "raw"
    p_adjusted: float
    decision: AlertDecision

    @property
    def alert(self) -> bool:
        return self.decision.alert


@dataclass(frozen=True)
class SegmentReport:
    tests: list[SegmentTest]
    thresholds: AlertThresholds
    rows: int

    @property
    def alerts(self) -> list[SegmentTest]:
        return [test for test in self.tests if test.alert]

    def to_dict(self) -> dict:
        """JSON-ready (nan and inf become None)."""
        return _json_safe(
            {
                "rows": self.rows,
                "thresholds": asdict(self.thresholds),
                "tests": [{**asdict(t), "alert": t.alert} for t in self.tests],
            }
        )


def _json_safe(value):
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _memberships(column: pd.Series) -> dict[str, np.ndarray]:
    """Segment -> boolean mask; a cell may hold one label or a list of labels (registers)."""
    cells = column.reset_index(drop=True)
    exploded = cells.explode().dropna()  # list-likes become one row per label; plain labels stay
    codes, labels = pd.factorize(exploded.astype(str))
    masks = {}
    positions = exploded.index.to_numpy()
    for code, label in enumerate(labels):
        mask = np.zeros(len(cells), dtype=bool)
        mask[positions[codes == code]] = True
        masks[str(label)] = mask
    return dict(sorted(masks.items()))


def segment_report(
    rows: pd.DataFrame | Iterable[Mapping],
    *,
    segment_fields: Sequence[str],
    metrics: Sequence[Metric],
    intent_field: str | None = "intent",
    thresholds: AlertThresholds = AlertThresholds(),  # noqa: B008 (frozen)
    confidence: float = DEFAULT_CONFIDENCE,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> SegmentReport:
    """Every segment of every ``segment_fields`` column against the rest, on every metric.

    ``rows``: one per rated reply, with the segment columns (a label, or a list of
    labels for multi-label fields such as registers), the intent column and one
    column per metric. Each (segment, metric) gets intervals, a raw test, the
    within-intent comparison when ``intent_field`` is given, and the alert decision;
    Benjamini-Hochberg runs once over all decision p-values of the report.
    """
    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    missing = [name for name in [*segment_fields, *(m.name for m in metrics)] if name not in frame.columns]
    if intent_field is not None and intent_field not in frame.columns:
        missing.append(intent_field)
    if missing:
        raise ValueError(f"segment_report: the rows have no column(s) {', '.join(missing)}")
    columns = {m.name: pd.to_numeric(frame[m.name], errors="coerce").to_numpy(float) for m in metrics}
    intent_codes = pd.factorize(frame[intent_field].astype(object))[0] if intent_field is not None else None
    drafts = []
    for field_name in segment_fields:
        for segment, mask in _memberships(frame[field_name]).items():
            for metric in metrics:
                raw = columns[metric.name]
                present = ~np.isnan(raw)
                seg_values, rest_values = raw[mask & present], raw[~mask & present]
                if seg_values.size == 0 or rest_values.size == 0:
                    continue
                drafts.append(
                    _draft(field_name, segment, metric, seg_values, rest_values, confidence, n_resamples, seed)
                )
                if intent_codes is not None:
                    # Rows without an intent (code -1) take no part in the within-intent comparison.
                    usable = present & (intent_codes >= 0)
                    codes = intent_codes[usable]
                    drafts[-1]["within_intent"] = _within_intent(
                        raw[usable],
                        mask[usable],
                        codes,
                        int(codes.max()) + 1 if codes.size else 0,
                        metric.kind,
                        confidence,
                    )
    (report,) = adjust_family([SegmentDrafts(drafts=drafts, thresholds=thresholds)])
    return replace(report, rows=len(frame))


def _draft(field_name, segment, metric, seg_values, rest_values, confidence, n_resamples, seed) -> dict:
    value, value_rest = float(seg_values.mean()), float(rest_values.mean())
    if metric.kind == RATE:
        if not np.isin(np.concatenate([seg_values, rest_values]), (0.0, 1.0)).all():
            raise ValueError(f"Metric {metric.name!r} is a rate: its values must be 0 or 1")
        k, k_rest = int(seg_values.sum()), int(rest_values.sum())
        interval = wilson_interval(k, seg_values.size, confidence=confidence)
        interval_rest = wilson_interval(k_rest, rest_values.size, confidence=confidence)
        p_value, test = rate_test(k, seg_values.size, k_rest, rest_values.size), "g-test"
    else:
        options = {"confidence": confidence, "n_resamples": n_resamples, "seed": seed, "max_n": BOOTSTRAP_MAX_N}
        interval = bootstrap_mean_interval(seg_values, **options)
        interval_rest = bootstrap_mean_interval(rest_values, **options)
        p_value, test = mean_test(seg_values, rest_values), "welch"
    return {
        "_metric": metric,
        "field": field_name,
        "segment": segment,
        "metric": metric.name,
        "kind": metric.kind,
        "better": metric.better,
        "n": int(seg_values.size),
        "n_rest": int(rest_values.size),
        "value": value,
        "value_rest": value_rest,
        "interval": interval,
        "interval_rest": interval_rest,
        "difference": value - value_rest,
        "relative_gap": relative_gap(value, value_rest),
        "ratio": favourable_ratio(value, value_rest, kind=metric.kind, better=metric.better),
        "test": test,
        "p_value": p_value,
    }


# --- the report from sufficient statistics (database aggregates) -------------------------


@dataclass(frozen=True)
class CellStats:
    """Count, sum and sum of squares of one metric over a set of rows, per intent code.

    What ``COUNT``, ``SUM`` and ``SUM(x*x)`` grouped by intent return; for a 0/1 rate the
    sum is the number of successes. Everything :func:`segment_report_from_stats` needs,
    so a dashboard can aggregate in the database instead of loading every row. Index
    ``i`` of each array is intent code ``i``; one code may stand for "no intent".
    """

    n: np.ndarray
    total: np.ndarray
    squares: np.ndarray

    @classmethod
    def empty(cls, n_codes: int) -> CellStats:
        return cls(np.zeros(n_codes), np.zeros(n_codes), np.zeros(n_codes))

    def __add__(self, other: CellStats) -> CellStats:
        return CellStats(self.n + other.n, self.total + other.total, self.squares + other.squares)

    def __sub__(self, other: CellStats) -> CellStats:
        return CellStats(self.n - other.n, self.total - other.total, self.squares - other.squares)

    @property
    def count(self) -> int:
        return int(round(float(self.n.sum())))

    @property
    def mean(self) -> float:
        return float(self.total.sum() / self.n.sum()) if self.n.sum() else math.nan

    @property
    def variance(self) -> float:
        """Sample variance (ddof 1) of all the rows; 0.0 for fewer than two."""
        n = float(self.n.sum())
        if n < 2:
            return 0.0
        return max(0.0, (float(self.squares.sum()) - float(self.total.sum()) ** 2 / n) / (n - 1))


def t_mean_interval(stats_: CellStats, *, confidence: float = DEFAULT_CONFIDENCE) -> Interval:
    """The t interval of the mean from count, sum and sum of squares."""
    n = stats_.count
    if n == 0:
        return Interval(math.nan, math.nan, "none")
    if n == 1:
        return Interval(stats_.mean, stats_.mean, "normal")
    half = _t(confidence, n - 1) * math.sqrt(stats_.variance / n)
    return Interval(stats_.mean - half, stats_.mean + half, "normal")


def histogram_coarsen(values: np.ndarray, counts: np.ndarray, *, width: float) -> tuple[np.ndarray, np.ndarray]:
    """Merge a histogram's values into bins ``width`` wide (from the smallest value).

    Each bin stands at the count-weighted mean of its values, so the row count, the total
    and the mean are unchanged; only the spread within a bin is lost (at most
    ``width**2 / 4`` of variance, about ``width**2 / 12`` for values spread over the bin).
    Returns (bin values, counts), empty bins left out.
    """
    values = np.asarray(values, dtype=float)
    counts = np.asarray(counts, dtype=np.int64)
    if width <= 0 or values.size == 0:
        raise ValueError(f"histogram_coarsen needs a positive width and values, got width {width}")
    _, bin_of = np.unique(np.floor((values - values.min()) / width).astype(np.int64), return_inverse=True)
    merged = np.bincount(bin_of, weights=counts)
    totals = np.bincount(bin_of, weights=counts * values)
    keep = merged > 0
    return totals[keep] / merged[keep], np.rint(merged[keep]).astype(np.int64)


def bootstrap_mean_interval_from_counts(
    values: Sequence[float] | np.ndarray,
    counts: Sequence[int] | np.ndarray,
    *,
    confidence: float = DEFAULT_CONFIDENCE,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    bin_width_sd: float | None = None,
) -> Interval:
    """The percentile bootstrap of the mean from a histogram (distinct values and their counts).

    Resampling n rows with replacement from the rows is drawing the number of times each
    distinct value is picked from a multinomial(n, counts / n): the same bootstrap as
    :func:`bootstrap_mean_interval` on the expanded rows, at a cost of
    ``n_resamples x distinct values`` instead of ``n_resamples x n``. With many distinct
    values (latencies, lengths) and at least ``POISSON_MIN_N`` rows, each value's count is
    drawn as Poisson(count) instead (the Poisson bootstrap: Hanley & MacGibbon 2006,
    Chamandy et al. 2012), which gives the same interval to within the bootstrap's own
    resolution at a third of numpy's multinomial cost.

    ``bin_width_sd`` (off by default) first merges a histogram of more than
    ``POISSON_MIN_VALUES`` distinct values into bins that many standard deviations wide
    (:func:`histogram_coarsen`): the cost falls with the number of values, the mean is
    kept exactly, and at 0.25 the variance lost is under 1/64 (about 1/192 for values
    spread over their bins), so the interval narrows by under 0.8% (about 0.3%).
    """
    values = np.asarray(values, dtype=float)
    counts = np.asarray(counts, dtype=np.int64)
    keep = counts > 0
    values, counts = values[keep], counts[keep]
    n = int(counts.sum())
    if n == 0:
        return Interval(math.nan, math.nan, "none")
    if values.size == 1:
        return Interval(float(values[0]), float(values[0]), "bootstrap")
    if bin_width_sd and values.size > POISSON_MIN_VALUES:
        mean = float(counts @ values) / n
        sd = math.sqrt(float(counts @ (values - mean) ** 2) / n)
        if sd > 0:
            values, counts = histogram_coarsen(values, counts, width=bin_width_sd * sd)
    rng = np.random.default_rng(seed)
    if values.size > POISSON_MIN_VALUES and n >= POISSON_MIN_N:
        draws = rng.poisson(counts, size=(n_resamples, values.size)).astype(float)
        totals = draws.sum(axis=1)
        means = (draws @ values)[totals > 0] / totals[totals > 0]
    else:
        draws = rng.multinomial(n, counts / n, size=n_resamples)
        means = draws @ values / n
    alpha = 1 - confidence
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return Interval(float(low), float(high), "bootstrap")


def welch_test_from_stats(a: CellStats, b: CellStats) -> float:
    """Welch's t-test p-value from count, sum and sum of squares (as :func:`mean_test` on the rows)."""
    n_a, n_b = a.count, b.count
    if n_a < 2 or n_b < 2:
        return 1.0
    var_a, var_b = a.variance, b.variance
    if var_a == 0 and var_b == 0:
        return 1.0 if math.isclose(a.mean, b.mean, rel_tol=1e-12, abs_tol=1e-12) else 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        result = stats.ttest_ind_from_stats(
            a.mean, math.sqrt(var_a), n_a, b.mean, math.sqrt(var_b), n_b, equal_var=False
        )
    return float(result.pvalue)


MeanInterval = Callable[[str, str, str, CellStats, bool], Interval]  # field, segment, metric, stats, is_rest


def segment_report_from_stats(
    segments: Mapping[tuple[str, str], Mapping[str, CellStats]],
    population: Mapping[str, CellStats],
    **options,
) -> SegmentReport:
    """:func:`segment_report` from sufficient statistics: the same figures, tests and alert rule.

    The arguments are :func:`segment_drafts_from_stats`'s; Benjamini-Hochberg runs over
    this report's tests. To correct several reports as one family (one dashboard page),
    build their drafts and call :func:`adjust_family` once.
    """
    return adjust_family([segment_drafts_from_stats(segments, population, **options)])[0]


def segment_drafts_from_stats(
    segments: Mapping[tuple[str, str], Mapping[str, CellStats]],
    population: Mapping[str, CellStats],
    *,
    metrics: Sequence[Metric],
    use_intent: bool = True,
    no_intent_code: int | None = None,
    thresholds: AlertThresholds = AlertThresholds(),  # noqa: B008 (frozen)
    confidence: float = DEFAULT_CONFIDENCE,
    mean_interval: MeanInterval | None = None,
) -> SegmentDrafts:
    """Every segment against the rest on every metric from sufficient statistics, before correction.

    ``segments`` maps (field, segment) to each metric's :class:`CellStats` over the
    segment's rows; ``population`` holds each metric's over all rows, so the rest of a
    segment is ``population - segment`` (a row may be in several segments of one field,
    as with registers). ``no_intent_code`` names the intent code of rows without an
    intent, left out of the within-intent comparison. Means get the t interval unless
    ``mean_interval`` gives another (the dashboard's bootstrap from histograms).
    """
    drafts = []
    for (field_name, segment), per_metric in segments.items():
        for metric in metrics:
            seg = per_metric.get(metric.name)
            whole = population.get(metric.name)
            if seg is None or whole is None:
                continue
            rest = whole - seg
            if seg.count == 0 or rest.count == 0:
                continue
            drafts.append(_draft_from_stats(field_name, segment, metric, seg, rest, confidence, mean_interval))
            if use_intent:
                usable = np.ones(seg.n.size, dtype=bool)
                if no_intent_code is not None and 0 <= no_intent_code < usable.size:
                    usable[no_intent_code] = False
                drafts[-1]["within_intent"] = _within_intent_stats(
                    seg.n[usable],
                    seg.total[usable],
                    seg.squares[usable],
                    rest.n[usable],
                    rest.total[usable],
                    rest.squares[usable],
                    metric.kind,
                    confidence,
                    whole.variance,
                )
    return SegmentDrafts(drafts=drafts, thresholds=thresholds)


@dataclass
class SegmentDrafts:
    """Tests of one report before the Benjamini-Hochberg correction and the alert rule."""

    drafts: list
    thresholds: AlertThresholds


def adjust_family(reports: Sequence[SegmentDrafts]) -> list[SegmentReport]:
    """Benjamini-Hochberg over every test of ``reports`` together, then the alert rule; the finished reports."""
    flat = [d for report in reports for d in report.drafts]
    decision_p = [d["within_intent"].p_value if d.get("within_intent") else d["p_value"] for d in flat]
    adjusted = iter(benjamini_hochberg(decision_p))
    finished = []
    for report in reports:
        tests = []
        for draft in report.drafts:
            draft = dict(draft)
            p_adjusted = next(adjusted)
            within = draft.pop("within_intent", None)
            metric = draft.pop("_metric")
            value, reference = (within.observed, within.expected) if within else (draft["value"], draft["value_rest"])
            decision = alert_decision(
                n=draft["n"],
                p_adjusted=p_adjusted,
                value=value,
                reference=reference,
                kind=metric.kind,
                better=metric.better,
                thresholds=report.thresholds,
            )
            tests.append(
                SegmentTest(
                    **draft,
                    within_intent=within,
                    decision_basis="within-intent" if within else "raw",
                    p_adjusted=p_adjusted,
                    decision=decision,
                )
            )
        rows = max((t.n + t.n_rest for t in tests), default=0)
        finished.append(SegmentReport(tests=tests, thresholds=report.thresholds, rows=rows))
    return finished


def _draft_from_stats(field_name, segment, metric, seg: CellStats, rest: CellStats, confidence, mean_interval) -> dict:
    value, value_rest = seg.mean, rest.mean
    if metric.kind == RATE:
        k, k_rest = int(round(float(seg.total.sum()))), int(round(float(rest.total.sum())))
        interval = wilson_interval(k, seg.count, confidence=confidence)
        interval_rest = wilson_interval(k_rest, rest.count, confidence=confidence)
        p_value, test = rate_test(k, seg.count, k_rest, rest.count), "g-test"
    else:
        if mean_interval is not None:
            interval = mean_interval(field_name, segment, metric.name, seg, False)
            interval_rest = mean_interval(field_name, segment, metric.name, rest, True)
        else:
            interval = t_mean_interval(seg, confidence=confidence)
            interval_rest = t_mean_interval(rest, confidence=confidence)
        p_value, test = welch_test_from_stats(seg, rest), "welch"
    return {
        "_metric": metric,
        "field": field_name,
        "segment": segment,
        "metric": metric.name,
        "kind": metric.kind,
        "better": metric.better,
        "n": seg.count,
        "n_rest": rest.count,
        "value": value,
        "value_rest": value_rest,
        "interval": interval,
        "interval_rest": interval_rest,
        "difference": value - value_rest,
        "relative_gap": relative_gap(value, value_rest),
        "ratio": favourable_ratio(value, value_rest, kind=metric.kind, better=metric.better),
        "test": test,
        "p_value": p_value,
    }


def _weighted_mean(y_true, y_pred, sample_weight) -> float:  # MetricFrame's signature
    weights = np.asarray(sample_weight, dtype=float)
    return float(np.dot(np.asarray(y_true, dtype=float), weights) / weights.sum()) if weights.sum() else math.nan


def disaggregate_cells(
    means: Sequence[float] | np.ndarray,
    counts: Sequence[float] | np.ndarray,
    groups: Sequence[str] | np.ndarray,
    *,
    metric: str = "value",
    control: Sequence[str] | np.ndarray | None = None,
) -> Disaggregation:
    """:func:`disaggregate` from aggregated cells: each cell's mean and row count, its group (and control).

    fairlearn's ``MetricFrame`` gets one row per cell with the count as the sample
    weight, so the value by group, overall, and the differences and ratios are those of
    the rows the cells stand for, without loading the rows. Cells with no rows are
    left out.
    """
    from fairlearn.metrics import MetricFrame

    data = pd.DataFrame(
        {
            "value": np.asarray(means, dtype=float),
            "n": np.asarray(counts, dtype=float),
            "group": np.asarray(groups, dtype=object),
        }
    )
    if control is not None:
        data["control"] = np.asarray(control, dtype=object)
    data = data[(data["n"] > 0) & data["value"].notna()]
    if data.empty:
        raise ValueError(f"disaggregate_cells: no rows for metric {metric!r}")

    def frame(**extra):
        return MetricFrame(
            metrics={"value": _weighted_mean},
            y_true=data["value"].to_numpy(),
            y_pred=data["value"].to_numpy(),
            sensitive_features=data["group"].astype(str).rename("group"),
            sample_params={"value": {"sample_weight": data["n"].to_numpy()}},
            **extra,
        )

    whole = frame()
    counts_by_group = data.groupby(data["group"].astype(str))["n"].sum()
    result = Disaggregation(
        metric=metric,
        overall=float(whole.overall["value"]),
        by_group={str(k): float(v) for k, v in whole.by_group["value"].items()},
        counts={str(k): int(round(v)) for k, v in counts_by_group.items()},
        difference_between_groups=float(whole.difference(method="between_groups")["value"]),
        ratio_between_groups=float(whole.ratio(method="between_groups")["value"]),
        difference_to_overall=float(whole.difference(method="to_overall")["value"]),
        ratio_to_overall=float(whole.ratio(method="to_overall")["value"]),
    )
    if control is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            controlled = frame(control_features=data["control"].astype(str).rename("control")).by_group["value"]
        by_control: dict[str, dict[str, float]] = {}
        for (level, group), value in controlled.items():
            if not pd.isna(value):
                by_control.setdefault(str(level), {})[str(group)] = float(value)
        result = Disaggregation(**{**asdict(result), "by_control": by_control})
    return result
