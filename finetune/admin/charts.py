"""Server-rendered SVG charts for the admin (no JavaScript library, no CDN).

loss_curve_svg([{"step": 1, "loss": 2.3}, {"step": 2, "loss": 2.1}])
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from html import escape


def _ticks(low: float, high: float, count: int = 4) -> list[float]:
    if high <= low:
        return [low]
    return [low + (high - low) * i / count for i in range(count + 1)]


def loss_curve_svg(
    points: Iterable[Mapping[str, float]], *, width: int = 640, height: int = 220, title: str = "Training loss"
) -> str:
    """A line chart of ``loss`` over ``step``; a placeholder text when there are no points yet."""
    data = [
        (float(p["step"]), float(p["loss"]))
        for p in points
        if p.get("loss") is not None and math.isfinite(float(p["loss"]))
    ]
    left, right, top, bottom = 56, 16, 28, 36
    inner_w, inner_h = width - left - right, height - top - bottom
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="loss-curve" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title>",
        f'<rect x="{left}" y="{top}" width="{inner_w}" height="{inner_h}" fill="#fafafa" stroke="#ccc"/>',
        f'<text x="{left}" y="18" font-size="13" font-family="sans-serif" fill="#333">{escape(title)}</text>',
    ]
    if not data:
        parts.append(
            f'<text x="{left + inner_w / 2}" y="{top + inner_h / 2}" text-anchor="middle" font-size="12" '
            'font-family="sans-serif" fill="#888">No loss reported yet</text></svg>'
        )
        return "".join(parts)
    steps = [s for s, _ in data]
    losses = [loss for _, loss in data]
    x_low, x_high = min(steps), max(steps)
    y_low, y_high = min(losses), max(losses)
    if y_high - y_low < 1e-6:
        y_low, y_high = y_low - 0.5, y_high + 0.5
    pad = (y_high - y_low) * 0.05
    y_low, y_high = y_low - pad, y_high + pad

    def x(step: float) -> float:
        return left + (0.5 if x_high == x_low else (step - x_low) / (x_high - x_low)) * inner_w

    def y(loss: float) -> float:
        return top + (1 - (loss - y_low) / (y_high - y_low)) * inner_h

    for value in _ticks(y_low, y_high):
        parts.append(
            f'<line x1="{left}" x2="{left + inner_w}" y1="{y(value):.1f}" y2="{y(value):.1f}" stroke="#eee"/>'
            f'<text x="{left - 6}" y="{y(value) + 4:.1f}" text-anchor="end" font-size="11" '
            f'font-family="sans-serif" fill="#555">{value:.3f}</text>'
        )
    for value in sorted({x_low, x_high}):
        parts.append(
            f'<text x="{x(value):.1f}" y="{top + inner_h + 16}" text-anchor="middle" font-size="11" '
            f'font-family="sans-serif" fill="#555">{value:.0f}</text>'
        )
    parts.append(
        f'<text x="{left + inner_w / 2}" y="{height - 4}" text-anchor="middle" font-size="11" '
        'font-family="sans-serif" fill="#555">optimizer step</text>'
    )
    path = " ".join(f"{x(s):.1f},{y(loss):.1f}" for s, loss in data)
    parts.append(f'<polyline fill="none" stroke="#417690" stroke-width="2" points="{path}"/>')
    last_step, last_loss = data[-1]
    parts.append(f'<circle cx="{x(last_step):.1f}" cy="{y(last_loss):.1f}" r="3" fill="#417690"/>')
    parts.append("</svg>")
    return "".join(parts)
