"""Agreement between two raters on the same items: raw agreement and Cohen's kappa (scikit-learn).

Plain Python: lists of labels in, numbers out. Used for agent-vs-agent agreement on
double-reviewed replies and agent-vs-customer agreement on "Was this helpful?".
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sklearn.metrics import cohen_kappa_score


@dataclass(frozen=True)
class Agreement:
    n: int
    raw: float | None  # share of items both raters labelled the same
    kappa: float | None  # Cohen's kappa; None when undefined
    note: str = ""


def compare(first: Sequence[Any], second: Sequence[Any], *, weights: str | None = None) -> Agreement:
    """Raw agreement and Cohen's kappa of two raters' labels, item by item.

    ``weights`` ("linear" or "quadratic") weighs disagreements on an ordinal scale
    (a 1-5 score) by their distance. Kappa is undefined (None, with a note) when there
    are no items, or when both raters used one and the same label for everything
    (no variation to agree beyond chance on).
    """
    if len(first) != len(second):
        raise ValueError(f"Both raters need a label for every item ({len(first)} vs {len(second)}).")
    n = len(first)
    if n == 0:
        return Agreement(0, None, None, "no items rated by both")
    raw = sum(1 for a, b in zip(first, second, strict=True) if a == b) / n
    labels = sorted(set(first) | set(second))
    if len(labels) < 2:
        return Agreement(n, raw, None, "undefined: every item got the same label")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        kappa = float(cohen_kappa_score(first, second, labels=labels, weights=weights))
    if math.isnan(kappa):
        return Agreement(n, raw, None, "undefined for these labels")
    return Agreement(n, raw, kappa)
