"""The bias-monitoring dashboard's figures, aggregated in the database from ``ReplyOutcome`` rows.

Nothing here reads message text: the segment labels were stored when the messages
were written (``services.py``). One grouped query returns, for every combination of
model version, intent and segment labels, the count, sum and sum of squares of every
metric; the statistics of ``finetune.ml.fairness`` work on those sums
(``segment_drafts_from_stats``, ``disaggregate_cells``). Means get their bootstrap
intervals from value histograms, also counted in the database.

``monitoring_report`` returns a JSON-ready dict and keeps it in Django's cache: without
new replies it is served as it is; with new ones, for ``SUPPORTBOT_MONITORING_CACHE_S``
(the page says when it was computed and offers "Recompute"). Every Celery worker runs
``monitoring_report_refresh`` every ``SUPPORTBOT_MONITORING_REFRESH_S`` (``refresh.py``),
one at a time, so with a shared cache no page view waits for a computation.

Every figure is per segment x model version: a segment is compared with the rest of
the same version's replies (never across versions, whose traffic differs), within
intent (a segment that asks harder questions is not called biased; ``fairness``), and
Benjamini-Hochberg runs over every test on the page as one family.
"""

from __future__ import annotations

import hashlib
import json
import math
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import pandas as pd
from django.conf import settings
from django.core.cache import cache
from django.db import connections, transaction
from django.db.models import Count, F, FloatField, IntegerField, Max, Q, Sum, Value
from django.db.models.functions import Cast, Coalesce, TruncWeek
from django.utils import timezone

from finetune.ml import segments
from finetune.ml.fairness import (
    BOOTSTRAP_MAX_N,
    HIGHER,
    LOWER,
    MEAN,
    RATE,
    AlertThresholds,
    CellStats,
    Interval,
    Metric,
    adjust_family,
    bootstrap_mean_interval_from_counts,
    disaggregate_cells,
    segment_drafts_from_stats,
    t_mean_interval,
    wilson_interval,
)
from finetune.models import ModelVersion
from finetune.selectors import bias_thresholds

from ..models import ReplyOutcome, Review
from .services import REGISTER_FIELDS

CACHE_PREFIX = "monitoring-report:v1"
REFRESH_LOCK = "monitoring-report:refresh-lock"
REFRESH_LOCK_S = 600  # a recomputation takes seconds; a holder that died frees the lock after this
# Cache backends whose entries live in one process: a worker's figures never reach the page there.
_PROCESS_CACHES = ("django.core.cache.backends.locmem", "django.core.cache.backends.dummy")
NO_VERSION = "none"  # replies no recorded version wrote (a version deleted, or before versions existed)
NO_LABEL = "(none)"  # a segment field left empty: no page segment, intent unknown, message unlabelled
BOOTSTRAP_RESAMPLES = 2000
# The bootstrap's histograms are merged into bins a quarter of a standard deviation wide
# (fairness.histogram_coarsen): latencies in 10 ms bins have ~150 distinct values per
# cell, a quarter-sd bin ~40, and the bootstrap costs in proportion; the mean is kept
# exactly and the interval narrows by under 0.8% (about 0.3% typically).
BOOTSTRAP_BIN_WIDTH_SD = 0.25
AGGREGATE_WORK_MEM = "32MB"  # PostgreSQL's memory for the grouped queries (see _fetch)
# Measures the fairlearn disaggregation is shown for: each costs a MetricFrame (about
# 0.1 s) per tested dimension and version; the others read better in the tables.
DISAGGREGATED = ("bad", "helpful")


@dataclass(frozen=True)
class MonitoredMetric:
    metric: Metric
    field: str  # the ReplyOutcome column
    unit: str  # "rate" (shown as %), "score", "words", "ms"
    bucket: int = 1  # histogram bin width for the bootstrap (latency: 10 ms)

    @property
    def name(self) -> str:
        return self.metric.name


METRICS: tuple[MonitoredMetric, ...] = (
    MonitoredMetric(Metric("bad", RATE, LOWER, "Bad rating"), "bad", "rate"),
    MonitoredMetric(Metric("score", MEAN, HIGHER, "Mean score (1-5)"), "rating", "score"),
    *(
        MonitoredMetric(Metric(f"reason_{code}", RATE, LOWER, f"Reported: {label}"), f"reason_{code}", "rate")
        for code, label in Review.Reason.choices
    ),
    MonitoredMetric(Metric("helpful", RATE, HIGHER, "Customer said helpful"), "helpful", "rate"),
    MonitoredMetric(Metric("handoff", RATE, LOWER, "Handed to a human"), "handoff", "rate"),
    MonitoredMetric(Metric("corrected", RATE, LOWER, "Corrected by an agent"), "corrected", "rate"),
    # Shorter counts as worse: curt replies to some customers are the disparity watched for.
    MonitoredMetric(Metric("reply_words", MEAN, HIGHER, "Reply length (words)"), "reply_words", "words"),
    MonitoredMetric(Metric("latency_ms", MEAN, LOWER, "Latency (ms)"), "latency_ms", "ms", bucket=10),
)
METRIC_BY_NAME = {m.name: m for m in METRICS}


@dataclass(frozen=True)
class Dimension:
    name: str
    label: str
    tested: bool  # compared segment against rest; intent is the control, not a segment under test


DIMENSIONS = (
    Dimension("register", "Language register", True),
    Dimension("language", "Language", True),
    Dimension("page_segment", "Page segment", True),
    Dimension("intent", "Intent (the control)", False),
)
_REGISTER_FLAGS = tuple(REGISTER_FIELDS.values())
_KEYS = ("model_version", "intent", "register", "language", "page_segment", *_REGISTER_FLAGS)


@dataclass(frozen=True)
class MonitoringFilters:
    """The dashboard's window: replies of the last ``days`` days (None: all), of some versions (empty: all)."""

    days: int | None = None
    versions: tuple[int, ...] = ()

    @classmethod
    def from_query(cls, data) -> MonitoringFilters:
        """From a query string (``days``: a number or ``all``; ``version``: ids, repeated)."""
        raw = str(data.get("days", "")).strip()
        if raw == "all":
            days = None
        elif raw.isdigit() and 0 < int(raw) <= 3650:
            days = int(raw)
        else:
            days = settings.SUPPORTBOT_MONITORING_DAYS
        listed = data.getlist("version") if hasattr(data, "getlist") else data.get("version", [])
        versions = tuple(sorted({int(v) for v in listed if str(v).isdigit()}))
        return cls(days=days, versions=versions)

    def queryset(self):
        rows = ReplyOutcome.objects.all()
        if self.days is not None:
            rows = rows.filter(created_at__gte=timezone.now() - timedelta(days=self.days))
        if self.versions:
            rows = rows.filter(model_version__in=self.versions)
        return rows


# --- database aggregation ----------------------------------------------------------------


def _aggregates() -> dict[str, Any]:
    """COUNT, SUM and SUM of squares of every metric (nulls, e.g. unreviewed replies, not counted)."""
    out: dict[str, Any] = {}
    for m in METRICS:
        if m.metric.kind == RATE:
            out[f"{m.name}__n"] = Count(m.field)
            out[f"{m.name}__s"] = Sum(Cast(m.field, IntegerField()))
        else:
            value = Cast(m.field, FloatField())  # squares of latencies overflow a 32-bit integer
            out[f"{m.name}__n"] = Count(m.field)
            out[f"{m.name}__s"] = Sum(value)
            out[f"{m.name}__q"] = Sum(value * value)
    return out


def _fetch(queryset) -> pd.DataFrame:
    """A ``values()`` queryset's rows as a DataFrame, read straight from the cursor.

    Django's per-row converters and dicts cost more than the grouped queries themselves
    at tens of thousands of rows; every column here is a plain number, string or
    boolean (SQLite's 0/1 booleans are read with ``astype(bool)`` where it matters).
    """
    sql, params = queryset.query.get_compiler(using=queryset.db).as_sql()
    connection = connections[queryset.db]
    with transaction.atomic(using=queryset.db), connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            # PostgreSQL's default 4 MB makes it sort the ~12,000 groups of 100,000 replies on
            # disk (0.35 s) where a hash in memory takes 0.15 s; only for this transaction.
            cursor.execute(f"SET LOCAL work_mem = '{AGGREGATE_WORK_MEM}'")
        cursor.execute(sql, params)
        columns = [column[0] for column in cursor.description]
        return pd.DataFrame(cursor.fetchall(), columns=columns)


def _version_keys(column: pd.Series) -> pd.Series:
    return column.map(lambda v: NO_VERSION if pd.isna(v) else str(int(v)))


def outcome_cells(filters: MonitoringFilters) -> pd.DataFrame:
    """One row per (version, intent, register labels, language, page segment) with every metric's sums."""
    frame = _fetch(filters.queryset().values(*_KEYS).annotate(rows=Count("pk"), **_aggregates()).order_by())
    for m in METRICS:
        if m.metric.kind == RATE:
            frame[f"{m.name}__q"] = frame[f"{m.name}__s"]  # 0/1 values: squares are the values
    sums = [c for c in frame.columns if "__" in c or c == "rows"]
    frame[sums] = frame[sums].fillna(0).astype(float)
    frame[list(_REGISTER_FLAGS)] = frame[list(_REGISTER_FLAGS)].fillna(False).astype(bool)
    frame["version"] = _version_keys(frame["model_version"])
    for name in ("intent", "register", "language", "page_segment"):
        frame[name] = frame[name].fillna("").replace("", NO_LABEL)
    return frame


def _histograms(
    filters: MonitoringFilters, metric: MonitoredMetric, dimension: str
) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]:
    """(version, segment) -> (values, counts) of a mean metric (binned by ``metric.bucket``, each
    bin at its middle) for every segment of one dimension, from one grouped query.

    Registers come as one row per (version, value) with a count per register (a message
    in two registers counts in both), not one per combination of register flags.
    """
    value = F(metric.field) if metric.bucket == 1 else (F(metric.field) / metric.bucket) * metric.bucket
    rows = filters.queryset().filter(**{f"{metric.field}__isnull": False}).annotate(v=value)
    if dimension == "register":
        counts = {f"c_{name}": Count("pk", filter=Q(**{flag: True})) for name, flag in REGISTER_FIELDS.items()}
        frame = _fetch(rows.values("model_version", "v").annotate(**counts).order_by("model_version", "v"))
    else:
        frame = _fetch(
            rows.annotate(segment=Coalesce(dimension, Value("")))
            .values("model_version", "segment", "v")
            .annotate(c=Count("pk"))
            .order_by("model_version", "segment", "v")
        )
    groups: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
    if frame.empty:
        return groups
    frame["version"] = _version_keys(frame["model_version"])
    # A bin's rows are spread over it: its middle, not its floor, stands for them.
    values = frame["v"].to_numpy(dtype=float) + (metric.bucket - 1) / 2
    if dimension == "register":
        for version, at in frame.groupby("version", sort=False).indices.items():
            for name in REGISTER_FIELDS:
                counts = frame[f"c_{name}"].to_numpy(dtype=np.int64)[at]
                if counts.any():
                    groups[(str(version), name)] = (values[at][counts > 0], counts[counts > 0])
    else:
        frame["segment"] = frame["segment"].replace("", NO_LABEL)
        counts = frame["c"].to_numpy(dtype=np.int64)
        for (version, segment), at in frame.groupby(["version", "segment"], sort=False).indices.items():
            groups[(str(version), str(segment))] = (values[at], counts[at])
    return groups


# --- from sums to statistics -------------------------------------------------------------


def _segment_masks(frame: pd.DataFrame, dimension: str) -> dict[str, np.ndarray]:
    """Segment label -> rows of ``frame`` in it. A message may carry several registers."""
    if dimension == "register":
        return {
            name: frame[flag].to_numpy(dtype=bool)
            for name, flag in REGISTER_FIELDS.items()
            if frame[flag].to_numpy(dtype=bool).any()
        }
    return {str(value): (frame[dimension] == value).to_numpy() for value in sorted(frame[dimension].unique())}


class _Sums:
    """Every metric's count, sum and sum of squares per cell of ``outcome_cells`` as arrays
    (read from the frame once), and their totals per intent code over a mask of cells."""

    def __init__(self, frame: pd.DataFrame, codes: np.ndarray, n_codes: int):
        self.codes, self.n_codes = codes, n_codes
        self.columns = {
            m.name: tuple(frame[f"{m.name}__{part}"].to_numpy(dtype=float) for part in "nsq") for m in METRICS
        }
        self.rows = frame["rows"].to_numpy(dtype=float)

    def stats(self, mask: np.ndarray) -> dict[str, CellStats]:
        sub = self.codes[mask]
        return {
            name: CellStats(*(np.bincount(sub, weights=column[mask], minlength=self.n_codes) for column in columns))
            for name, columns in self.columns.items()
        }


class _Intervals:
    """Each mean's interval: the bootstrap from a value histogram up to ``BOOTSTRAP_MAX_N`` values
    (as ``fairness.bootstrap_mean_interval``), the t interval above; rates get Wilson's."""

    def __init__(self, filters: MonitoringFilters):
        self.filters = filters
        self._hist: dict[tuple[str, str], dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]] = {}
        self._done: dict[tuple, Interval] = {}  # a cell's interval is shown in its row and its test

    def histogram(self, metric: MonitoredMetric, dimension: str) -> dict[tuple[str, str], tuple]:
        """(version, segment) -> (bin values, counts) of one mean metric over one dimension, from one query."""
        key = (metric.name, dimension)
        if key not in self._hist:
            self._hist[key] = _histograms(self.filters, metric, dimension)
        return self._hist[key]

    def mean(self, stats: CellStats, metric: MonitoredMetric, dimension, version, segment, rest=False) -> Interval:
        """The bootstrap for a segment's own values; the rest of a segment (its test's reference,
        whose interval the page does not show) gets the t interval, as does anything above
        ``BOOTSTRAP_MAX_N`` values."""
        if stats.count == 0:
            return Interval(math.nan, math.nan, "none")
        if rest or stats.count > BOOTSTRAP_MAX_N:
            return t_mean_interval(stats)
        key = (metric.name, dimension, version, segment)
        if key not in self._done:
            if segment is None:  # the whole version: every segment of a single-label dimension
                parts = [v for (ver, _), v in self.histogram(metric, "language").items() if ver == version]
                values = np.concatenate([p[0] for p in parts]) if parts else np.array([])
                counts = np.concatenate([p[1] for p in parts]) if parts else np.array([])
            else:
                values, counts = self.histogram(metric, dimension).get((version, segment), (np.array([]), np.array([])))
            self._done[key] = bootstrap_mean_interval_from_counts(
                values, counts, n_resamples=BOOTSTRAP_RESAMPLES, seed=0, bin_width_sd=BOOTSTRAP_BIN_WIDTH_SD
            )
        return self._done[key]

    def of(self, stats: CellStats, metric: MonitoredMetric, dimension, version, segment, rest=False) -> Interval:
        if metric.metric.kind == RATE:
            return wilson_interval(int(round(float(stats.total.sum()))), stats.count)
        return self.mean(stats, metric, dimension, version, segment, rest)


def _num(value: float | None) -> float | None:
    return None if value is None or (isinstance(value, float) and (math.isnan(value) or math.isinf(value))) else value


def _figure(stats: CellStats, interval: Interval) -> dict[str, Any]:
    return {
        "value": _num(stats.mean),
        "low": _num(interval.low),
        "high": _num(interval.high),
        "n": stats.count,
        "method": interval.method,
    }


# --- the report --------------------------------------------------------------------------


def _version_labels(frame: pd.DataFrame) -> list[dict[str, Any]]:
    ids = sorted({int(v) for v in frame["version"] if v != NO_VERSION})
    numbers = dict(ModelVersion.objects.filter(pk__in=ids).values_list("pk", "number"))
    versions = [{"key": str(pk), "id": pk, "label": f"v{numbers.get(pk, '?')}"} for pk in ids]
    versions.sort(key=lambda v: numbers.get(v["id"], 0))
    if (frame["version"] == NO_VERSION).any():
        versions.append({"key": NO_VERSION, "id": None, "label": "no version"})
    return versions


def monitoring_report_compute(
    filters: MonitoringFilters, *, thresholds: AlertThresholds | None = None
) -> dict[str, Any]:
    """The dashboard's figures, computed now from the database (``monitoring_report`` caches them)."""
    thresholds = thresholds or bias_thresholds()
    frame = outcome_cells(filters)
    report: dict[str, Any] = {
        "computed_at": timezone.now().isoformat(),
        "filters": {"days": filters.days, "versions": list(filters.versions)},
        "thresholds": asdict(thresholds),
        "rows": int(frame["rows"].sum()) if len(frame) else 0,
        "metrics": [
            {"name": m.name, "label": m.metric.label, "kind": m.metric.kind, "better": m.metric.better, "unit": m.unit}
            for m in METRICS
        ],
        "versions": _version_labels(frame) if len(frame) else [],
        "dimensions": [],
        "tests": [],
        "alerts": [],
        "by_version": [],
        "trend": monitoring_trend(filters),
        "segmenter_version": segments.SEGMENTER_VERSION,
    }
    if not len(frame):
        return report
    intents, uniques = pd.factorize(frame["intent"])
    no_intent = list(uniques).index(NO_LABEL) if NO_LABEL in set(uniques) else None
    n_codes = len(uniques)
    intervals = _Intervals(filters)
    sums = _Sums(frame, intents, n_codes)
    labels = {v["key"]: v["label"] for v in report["versions"]}
    families, family_keys = [], []
    in_versions = {v["key"]: (frame["version"] == v["key"]).to_numpy() for v in report["versions"]}
    populations = {key: sums.stats(mask) for key, mask in in_versions.items()}
    for version in report["versions"]:
        population = populations[version["key"]]
        report["by_version"].append(
            {
                "version": version["label"],
                "metrics": {
                    m.name: _figure(
                        population[m.name], intervals.of(population[m.name], m, "language", version["key"], None)
                    )
                    for m in METRICS
                },
            }
        )
    for dimension in DIMENSIONS:
        masks = _segment_masks(frame, dimension.name)
        section: dict[str, Any] = {
            "name": dimension.name,
            "label": dimension.label,
            "tested": dimension.tested,
            "segments": list(masks),
            "cells": [],
            "disaggregation": [],
        }
        for version in report["versions"]:
            in_version, population = in_versions[version["key"]], populations[version["key"]]
            per_segment = {}
            for segment, mask in masks.items():
                n = int(sums.rows[mask & in_version].sum())
                if n == 0:
                    continue
                stats = sums.stats(mask & in_version)
                per_segment[(dimension.name, segment)] = stats
                section["cells"].append(
                    {
                        "segment": segment,
                        "version": version["label"],
                        "version_key": version["key"],
                        "n": n,
                        "small": n < thresholds.min_n,
                        "metrics": {
                            m.name: _figure(
                                stats[m.name],
                                intervals.of(stats[m.name], m, dimension.name, version["key"], segment),
                            )
                            for m in METRICS
                        },
                        "alerts": [],
                    }
                )
            if dimension.tested and per_segment:

                def mean_interval(field, segment, metric, stats, is_rest, _version=version["key"]):
                    return intervals.mean(stats, METRIC_BY_NAME[metric], field, _version, segment, rest=is_rest)

                families.append(
                    segment_drafts_from_stats(
                        per_segment,
                        population,
                        metrics=[m.metric for m in METRICS],
                        no_intent_code=no_intent,
                        thresholds=thresholds,
                        mean_interval=mean_interval,
                    )
                )
                family_keys.append((dimension.name, version))
            if dimension.tested:
                section["disaggregation"].extend(_disaggregation(frame, dimension.name, in_version, version["label"]))
        report["dimensions"].append(section)
    for (dimension_name, version), finished in zip(family_keys, adjust_family(families), strict=True):
        section = next(s for s in report["dimensions"] if s["name"] == dimension_name)
        for test in finished.tests:
            row = _test_row(test, version["label"], labels)
            report["tests"].append(row)
            if row["alert"]:
                report["alerts"].append(row)
                for cell in section["cells"]:
                    if cell["segment"] == test.segment and cell["version_key"] == version["key"]:
                        cell["alerts"].append(test.metric)
    return report


def _test_row(test, version_label: str, labels: dict[str, str]) -> dict[str, Any]:
    within = test.within_intent
    return {
        "dimension": test.field,
        "segment": test.segment,
        "version": version_label,
        "metric": test.metric,
        "label": METRIC_BY_NAME[test.metric].metric.label,
        "n": test.n,
        "n_rest": test.n_rest,
        "value": _num(test.value),
        "value_rest": _num(test.value_rest),
        "low": _num(test.interval.low),
        "high": _num(test.interval.high),
        "rest_low": _num(test.interval_rest.low),
        "rest_high": _num(test.interval_rest.high),
        "expected": _num(within.expected) if within else None,
        "observed": _num(within.observed) if within else None,
        "coverage": _num(within.coverage) if within else None,
        "relative_gap": _num(test.relative_gap),
        "ratio": _num(test.ratio),
        "test": within.test if within else test.test,
        "basis": test.decision_basis,
        "p_value": _num(within.p_value if within else test.p_value),
        "p_adjusted": _num(test.p_adjusted),
        "direction": test.decision.direction,
        "alert": test.alert,
        "reason": test.decision.reason,
    }


def _disaggregation(frame: pd.DataFrame, dimension: str, in_version: np.ndarray, version_label: str) -> list[dict]:
    """fairlearn MetricFrame per metric over this version's cells, grouped by the dimension
    (registers by the primary register: MetricFrame needs one group per row)."""
    group_column = "register" if dimension == "register" else dimension
    sub = frame[in_version]
    if sub.empty:
        return []
    grouped = sub.groupby([group_column], dropna=False)
    out = []
    for name in DISAGGREGATED:
        sums = grouped[[f"{name}__n", f"{name}__s"]].sum()
        counts = sums[f"{name}__n"].to_numpy()
        if counts.sum() == 0:
            continue
        with np.errstate(divide="ignore", invalid="ignore"):
            means = np.where(counts > 0, sums[f"{name}__s"].to_numpy() / np.maximum(counts, 1), np.nan)
        result = disaggregate_cells(means, counts, [str(g) for g in sums.index], metric=name)
        out.append(
            {
                "version": version_label,
                "metric": name,
                "label": METRIC_BY_NAME[name].metric.label,
                "overall": _num(result.overall),
                "by_group": {k: _num(v) for k, v in result.by_group.items()},
                "counts": result.counts,
                "difference": _num(result.difference_between_groups),
                "ratio": _num(result.ratio_between_groups),
                "difference_to_overall": _num(result.difference_to_overall),
                "ratio_to_overall": _num(result.ratio_to_overall),
            }
        )
    return out


TREND_METRICS = ("bad", "helpful", "handoff")


def monitoring_trend(filters: MonitoringFilters) -> dict[str, Any]:
    """Weekly rate per version of the bad-rating, helpful and handoff rates, with Wilson intervals."""
    aggregates = {}
    for name in TREND_METRICS:
        field = METRIC_BY_NAME[name].field
        aggregates[f"{name}__n"] = Count(field)
        aggregates[f"{name}__s"] = Sum(Cast(field, IntegerField()))
    rows = list(
        filters.queryset()
        .annotate(week=TruncWeek("created_at"))
        .values("week", "model_version__number")
        .annotate(rows=Count("pk"), **aggregates)
        .order_by("week", "model_version__number")
    )
    weeks = sorted({row["week"].date().isoformat() for row in rows})
    series = []
    for name in TREND_METRICS:
        by_version: dict[str, list] = {}
        for row in rows:
            n, k = row[f"{name}__n"] or 0, row[f"{name}__s"] or 0
            if not n:
                continue
            label = f"v{row['model_version__number']}" if row["model_version__number"] is not None else "no version"
            interval = wilson_interval(int(k), int(n))
            by_version.setdefault(label, []).append(
                {
                    "week": row["week"].date().isoformat(),
                    "value": k / n,
                    "low": interval.low,
                    "high": interval.high,
                    "n": n,
                }
            )
        for label, points in by_version.items():
            series.append(
                {"metric": name, "label": METRIC_BY_NAME[name].metric.label, "version": label, "points": points}
            )
    return {"weeks": weeks, "series": series}


def monitoring_version_choices() -> list[tuple[int, str]]:
    """(id, label) of every model version, oldest first, for the dashboard's version filter."""
    return [(pk, f"v{number}") for pk, number in ModelVersion.objects.order_by("number").values_list("pk", "number")]


# --- cache ---------------------------------------------------------------------------------


def _fingerprint(filters: MonitoringFilters) -> str:
    """Changes whenever a reply outcome of the window is written (count and last write)."""
    summary = filters.queryset().aggregate(n=Count("pk"), last=Max("updated_at"))
    return f"{summary['n']}:{summary['last'].isoformat() if summary['last'] else '-'}"


def _cache_key(filters: MonitoringFilters, thresholds: AlertThresholds) -> str:
    raw = json.dumps({"f": asdict(filters), "t": asdict(thresholds)}, sort_keys=True)
    return f"{CACHE_PREFIX}:{hashlib.sha256(raw.encode()).hexdigest()[:24]}"


def monitoring_cache_is_shared() -> bool:
    """Whether every process reads one cache (Redis), so figures one process computes serve the others."""
    backend = settings.CACHES["default"]["BACKEND"]
    return backend.rsplit(".", 1)[0] not in _PROCESS_CACHES


def monitoring_refresh_interval() -> float | None:
    """Seconds between the workers' recomputations (``SUPPORTBOT_MONITORING_REFRESH_S``); None when
    they do not run: turned off, or a cache of each process's own that a worker cannot fill for the page."""
    interval = settings.SUPPORTBOT_MONITORING_REFRESH_S
    return interval if interval > 0 and monitoring_cache_is_shared() else None


def monitoring_report_refresh(filters: MonitoringFilters | None = None) -> dict[str, Any] | None:
    """Recompute and keep the figures of ``filters`` (default: the page's default window) when replies
    changed since they were kept; None when nothing changed or another process is recomputing.

    What every worker runs every ``SUPPORTBOT_MONITORING_REFRESH_S``: the lock (an atomic
    ``cache.add``, SET NX in Redis) lets one process compute while the others skip, and the
    one that comes next finds the fingerprint current and does nothing.
    """
    filters = filters or MonitoringFilters.from_query({})
    token = uuid.uuid4().hex
    if not cache.add(REFRESH_LOCK, token, timeout=REFRESH_LOCK_S):
        return None
    try:
        thresholds = bias_thresholds()
        kept = cache.get(_cache_key(filters, thresholds))
        fingerprint = _fingerprint(filters)
        if kept is not None and kept.get("fingerprint") == fingerprint:
            return None
        return _report_compute_and_keep(filters, thresholds, fingerprint)
    finally:
        if cache.get(REFRESH_LOCK) == token:  # not a lock that expired and another process took
            cache.delete(REFRESH_LOCK)


def _report_compute_and_keep(filters: MonitoringFilters, thresholds: AlertThresholds, fingerprint: str) -> dict:
    report = monitoring_report_compute(filters, thresholds=thresholds)
    report["fingerprint"] = fingerprint
    cache.set(_cache_key(filters, thresholds), report, timeout=None)
    return report


def monitoring_report(filters: MonitoringFilters, *, refresh: bool = False) -> dict[str, Any]:
    """The dashboard's figures: kept ones while nothing changed (or for ``SUPPORTBOT_MONITORING_CACHE_S``
    after a change), else computed now. ``report["fresh"]`` says whether they include every reply."""
    thresholds = bias_thresholds()
    key = _cache_key(filters, thresholds)
    fingerprint = _fingerprint(filters)
    kept = None if refresh else cache.get(key)
    if kept is not None:
        age = (timezone.now() - pd.Timestamp(kept["computed_at"]).to_pydatetime()).total_seconds()
        if kept["fingerprint"] == fingerprint or age < settings.SUPPORTBOT_MONITORING_CACHE_S:
            return {**kept, "fresh": kept["fingerprint"] == fingerprint, "from_cache": True}
    report = _report_compute_and_keep(filters, thresholds, fingerprint)
    return {**report, "fresh": True, "from_cache": False}


# --- CSV -----------------------------------------------------------------------------------

CSV_COLUMNS = (
    "dimension",
    "segment",
    "version",
    "metric",
    "value",
    "low",
    "high",
    "interval_method",
    "n",
    "small_n",
    "rest_value",
    "expected_within_intent",
    "p_value",
    "p_adjusted",
    "alert",
    "reason",
)


def monitoring_csv_rows(report: dict[str, Any]) -> Iterable[dict[str, Any]]:
    """One row per dimension x segment x version x metric, with its segment-against-rest test."""
    tests = {(t["dimension"], t["segment"], t["version"], t["metric"]): t for t in report["tests"]}
    for section in report["dimensions"]:
        for cell in section["cells"]:
            for name, figure in cell["metrics"].items():
                test = tests.get((section["name"], cell["segment"], cell["version"], name), {})
                yield {
                    "dimension": section["name"],
                    "segment": cell["segment"],
                    "version": cell["version"],
                    "metric": name,
                    "value": figure["value"],
                    "low": figure["low"],
                    "high": figure["high"],
                    "interval_method": figure["method"],
                    "n": figure["n"],
                    "small_n": figure["n"] < report["thresholds"]["min_n"],
                    "rest_value": test.get("value_rest"),
                    "expected_within_intent": test.get("expected"),
                    "p_value": test.get("p_value"),
                    "p_adjusted": test.get("p_adjusted"),
                    "alert": test.get("alert", False),
                    "reason": test.get("reason", "" if section["tested"] else "intent is the control, not tested"),
                }
