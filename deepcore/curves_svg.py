"""Training curves as a self-contained SVG, written without any plotting library.

`deepcore train` draws its curves with this (about a millisecond, where importing and
rendering with matplotlib takes half a second or more on a laptop core); matplotlib stays
the way to a PNG (:func:`deepcore.plotting.training_curves` with a ``.png`` path).
Two panels, loss and accuracy in percent per epoch, train solid and validation dashed,
each with "nice" ticks (1, 2 or 5 times a power of ten), a grid and a legend. A point
(epoch e, value v) sits at ``x = left + (e - lo) / (hi - lo) * width`` and likewise for y,
with (lo, hi) the panel's tick range, so the tick labels read the data back exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .callbacks import History

WIDTH, HEIGHT = 1100, 420
_PANEL_W, _PANEL_H = 440, 290
_LEFT = (80, 620)  # each panel's left edge
_TOP = 70
_STYLES = (("", "train ", "#1f77b4", ""), ("val_", "validation ", "#ff7f0e", ' stroke-dasharray="7 4"'))
_FONT = 'font-family="DejaVu Sans, Helvetica, Arial, sans-serif"'


def escape(text: str) -> str:
    """XML-escaped, without the control characters XML forbids (a data set's file name may hold one)."""
    # xml.sax.saxutils.escape's three replacements, without its import of urllib (~14 ms).
    kept = "".join(c for c in text if c >= " " or c in "\t\n")
    return kept.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def nice_ticks(lo: float, hi: float, target: int = 6) -> list[float]:
    """Ticks covering [lo, hi]: a step of 1, 2 or 5 x 10^k giving about ``target`` intervals,
    the first tick at or below ``lo`` and the last at or above ``hi``."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"nice_ticks: the range must be finite, got [{lo}, {hi}]")
    if hi < lo:
        lo, hi = hi, lo
    if hi - lo <= 1e-9 * max(abs(lo), abs(hi)):  # one value (to a few ulps): an interval around it
        pad = abs(lo) * 0.05 or 0.5
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / max(1, target)
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw * (1 - 1e-12))
    first = math.floor(lo / step + 1e-9) * step
    count = math.ceil((hi - first) / step - 1e-9)
    return [_clean(first + i * step, step) for i in range(count + 1)]


def _clean(value: float, step: float) -> float:
    # 0.30000000000000004 -> 0.3: round to the step's decimals so labels and positions agree
    digits = max(0, -math.floor(math.log10(step)) + 1)
    return round(value, digits) + 0.0


def _label(value: float, step: float) -> str:
    digits = max(0, -math.floor(math.log10(step) + 1e-9))
    return f"{value:.{digits}f}"


def _panel(parts: list[str], left: int, title: str, ylabel: str, epochs: Sequence[float],
           series: Sequence[tuple[str, Sequence[float], str, str]]) -> None:
    finite = [v for _, values, _, _ in series for v in values if math.isfinite(v)]
    xt = nice_ticks(min(epochs), max(epochs), target=min(6, max(1, len(epochs) - 1))) if epochs else [0.0, 1.0]
    yt = nice_ticks(min(finite), max(finite), target=5) if finite else [0.0, 1.0]
    x0, x1, y0, y1 = xt[0], xt[-1], yt[0], yt[-1]

    def px(e: float) -> float:
        return left + (e - x0) / (x1 - x0) * _PANEL_W

    def py(v: float) -> float:
        return _TOP + _PANEL_H - (v - y0) / (y1 - y0) * _PANEL_H

    bottom = _TOP + _PANEL_H
    parts.append(f'<g class="panel" data-title="{escape(title)}">')
    parts.append(f'<text x="{left + _PANEL_W / 2}" y="{_TOP - 12}" text-anchor="middle" font-size="15" '
                 f'{_FONT}>{escape(title)}</text>')
    for value in xt:
        x = px(value)
        parts.append(f'<line x1="{x:.2f}" y1="{_TOP}" x2="{x:.2f}" y2="{bottom}" stroke="#ddd"/>')
        parts.append(f'<text class="xtick" data-value="{value!r}" x="{x:.2f}" y="{bottom + 18}" '
                     f'text-anchor="middle" font-size="12" {_FONT}>{_label(value, xt[1] - xt[0])}</text>')
    for value in yt:
        y = py(value)
        parts.append(f'<line x1="{left}" y1="{y:.2f}" x2="{left + _PANEL_W}" y2="{y:.2f}" stroke="#ddd"/>')
        parts.append(f'<text class="ytick" data-value="{value!r}" x="{left - 6}" y="{y + 4:.2f}" '
                     f'text-anchor="end" font-size="12" {_FONT}>{_label(value, yt[1] - yt[0])}</text>')
    parts.append(f'<rect x="{left}" y="{_TOP}" width="{_PANEL_W}" height="{_PANEL_H}" fill="none" stroke="#333"/>')
    parts.append(f'<text x="{left + _PANEL_W / 2}" y="{bottom + 40}" text-anchor="middle" font-size="13" '
                 f'{_FONT}>epoch</text>')
    parts.append(f'<text x="{left - 58}" y="{_TOP + _PANEL_H / 2}" text-anchor="middle" font-size="13" '
                 f'transform="rotate(-90 {left - 58} {_TOP + _PANEL_H / 2})" {_FONT}>{escape(ylabel)}</text>')
    points: list[tuple[float, float]] = []
    for name, values, colour, dash in series:
        # a non-finite value breaks the line rather than bending it off the chart
        runs: list[list[tuple[float, float]]] = [[]]
        for e, v in zip(epochs, values, strict=False):
            if math.isfinite(v):
                runs[-1].append((px(e), py(v)))
            elif runs[-1]:
                runs.append([])
        for run in runs:
            points += run
            if len(run) == 1:  # a lone epoch: a dot, since a one-point polyline draws nothing
                parts.append(f'<circle class="series" data-name="{escape(name)}" cx="{run[0][0]:.2f}" '
                             f'cy="{run[0][1]:.2f}" r="3" fill="{colour}"/>')
            elif run:
                coords = " ".join(f"{x:.2f},{y:.2f}" for x, y in run)
                parts.append(f'<polyline class="series" data-name="{escape(name)}" points="{coords}" '
                             f'fill="none" stroke="{colour}" stroke-width="2"{dash}/>')
    if series:
        _legend(parts, left, series, points)
    parts.append("</g>")


def _legend(parts: list[str], left: int, series: Sequence[tuple[str, Sequence[float], str, str]],
            points: Sequence[tuple[float, float]]) -> None:
    # the corner whose box covers the fewest data points, as matplotlib's loc="best" does
    w, h = 190, 10 + 18 * len(series)
    corners = [(left + _PANEL_W - w - 8, _TOP + 8), (left + _PANEL_W - w - 8, _TOP + _PANEL_H - h - 8),
               (left + 8, _TOP + 8), (left + 8, _TOP + _PANEL_H - h - 8)]
    bx, by = min(corners, key=lambda c: sum(c[0] <= x <= c[0] + w and c[1] <= y <= c[1] + h for x, y in points))
    parts.append(f'<rect class="legend" x="{bx}" y="{by}" width="{w}" height="{h}" fill="white" '
                 f'fill-opacity="0.85" stroke="#ccc"/>')
    for i, (name, _, colour, dash) in enumerate(series):
        y = by + 17 + 18 * i
        parts.append(f'<line x1="{bx + 8}" y1="{y - 4}" x2="{bx + 36}" y2="{y - 4}" stroke="{colour}" '
                     f'stroke-width="2"{dash}/>')
        parts.append(f'<text x="{bx + 42}" y="{y}" font-size="12" {_FONT}>{escape(name)}</text>')


def curves_svg(history: History | Mapping[str, Sequence[float]], title: str) -> str:
    """The SVG text: ``history[key]`` for ``epoch``, ``loss``, ``accuracy``, ``val_loss`` and
    ``val_accuracy`` (a :class:`deepcore.train.History` or a dict of lists); accuracy is drawn
    in percent, as the console prints it. A key with no values draws no line."""
    epochs = [float(e) for e in history["epoch"]]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
             f'viewBox="0 0 {WIDTH} {HEIGHT}">',
             f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
             f'<text class="title" x="{WIDTH / 2}" y="28" text-anchor="middle" font-size="17" {_FONT}>'
             f'{escape(title)}</text>']
    for left, key, ylabel, scale in zip(_LEFT, ("loss", "accuracy"), ("loss", "accuracy (%)"), (1.0, 100.0),
                                        strict=True):
        series = []
        for prefix, name, colour, dash in _STYLES:
            values = [float(v) * scale for v in history[prefix + key]]
            if values:
                series.append((name + key, values, colour, dash))
        _panel(parts, left, key, ylabel, epochs, series)
    parts.append("</svg>\n")
    return "\n".join(parts)
