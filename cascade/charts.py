"""Charts as inline SVG (``cascade report``): bars and histograms with axes, titles and a description for screen
readers, drawn from numbers alone (no plotting library). Every label is escaped for HTML."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from html import escape

from cascade.display import money

__all__ = [
    "AUDIT_COLOR",
    "PALETTE",
    "STATUSES",
    "WIDTH",
    "Bar",
    "Chart",
    "bar_chart",
    "covering_ticks",
    "empty",
    "esc",
    "histogram",
    "inner_ticks",
    "money_tick",
    "plain",
    "tier_color",
]

#: Okabe-Ito colours (told apart with any colour vision), one per tier from tier 1; audit requests are grey
PALETTE = ("#0072b2", "#e69f00", "#009e73", "#d55e00", "#cc79a7", "#56b4e9", "#8c6d31")
AUDIT_COLOR = "#6f6f6f"
STATUSES = {"succeeded": "#009e73", "failed": "#d55e00", "queued": "#56b4e9", "running": "#e69f00",
            "cancelled": "#999999"}
WIDTH = 720
_TITLE_H = 28
_CHAR_W = 6.6  # about the width of a 12 px sans-serif character: room for labels
_MAX_LABEL = 38


def esc(value: object) -> str:
    """``value`` as text safe in HTML and SVG, in element content and in quoted attributes."""
    return escape(str(value), quote=True)


def tier_color(tier: int) -> str:
    return AUDIT_COLOR if tier < 1 else PALETTE[(tier - 1) % len(PALETTE)]


def _step(span: float, target: int, whole: bool = False) -> float:
    """A round step (1, 2, 2.5 or 5 times a power of ten; ``whole``: a whole number, at least 1) that cuts
    ``span`` into about ``target`` parts."""
    if not (span > 0 and math.isfinite(span)):
        return 1.0
    raw = span / target
    magnitude = 10.0 ** math.floor(math.log10(raw))
    steps: tuple[float, ...] = (1, 2, 2.5, 5)
    if whole and magnitude < 10:
        magnitude, steps = max(magnitude, 1.0), (1, 2, 5)
    return next((m * magnitude for m in steps if m * magnitude >= raw * (1 - 1e-9)), 10 * magnitude)


def covering_ticks(hi: float, target: int = 5, *, whole: bool = False) -> list[float]:
    """Round ticks from 0 to the first at or above ``hi`` (0 and 1 when ``hi`` is 0); ``whole``: steps of at
    least 1 (counts)."""
    step = _step(hi, target, whole)
    return [float(f"{i * step:.12g}") for i in range(max(1, math.ceil(hi / step - 1e-9)) + 1)]


def inner_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """Round ticks from ``lo`` to ``hi`` (each included when round)."""
    step = _step(hi - lo, target)
    return [float(f"{k * step:.12g}") for k in range(math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9) + 1)]


def plain(value: float) -> str:
    """A number on an axis: thousands separated, no trailing zeros (``1,250``, ``0.25``)."""
    return f"{value:,.6f}".rstrip("0").rstrip(".")


def money_tick(value: float) -> str:
    return money(Decimal(f"{value:.12g}"))


# --- charts ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Chart:
    """What every chart has: an id (unique in the page), a title, the value axis' title and tick labels
    (``whole``: counts, steps of at least 1), the names of stacked series (a legend when several) and colours."""

    ident: str
    title: str
    axis: str
    tick: Callable[[float], str] = plain
    whole: bool = False
    series: tuple[str, ...] = ()
    colors: tuple[str, ...] = PALETTE


@dataclass(frozen=True)
class Bar:
    """One horizontal bar: its label, its segments' values (one per series, stacked), the text at its end, its
    colour in a chart of one series, and the exact value (``data-value``; default: the drawn one)."""

    label: str
    values: tuple[float, ...]
    text: str
    color: str | None = None
    exact: str = ""


def _svg(chart: Chart, height: float, desc: str, content: str) -> str:
    i = esc(chart.ident)
    return (f'<svg class="chart" id="{i}" viewBox="0 0 {WIDTH} {height:.0f}" width="{WIDTH}" height="{height:.0f}" '
            f'role="img" aria-labelledby="{i}-title {i}-desc" font-family="sans-serif" font-size="12" fill="#222">'
            f'<title id="{i}-title">{esc(chart.title)}</title><desc id="{i}-desc">{esc(desc)}</desc>'
            f'<text class="title" x="0" y="18" font-size="14" font-weight="bold">{esc(chart.title)}</text>'
            f"{content}</svg>")


def _legend(chart: Chart, y: float) -> str:
    if len(chart.series) < 2:
        return ""
    parts, x = [], 0.0
    for name, color in zip(chart.series, chart.colors, strict=False):
        parts.append(f'<rect x="{x:.1f}" y="{y - 10:.1f}" width="12" height="12" fill="{color}"/>'
                     f'<text x="{x + 16:.1f}" y="{y:.1f}">{esc(name)}</text>')
        x += 28 + _CHAR_W * len(name)
    return f'<g class="legend">{"".join(parts)}</g>'


def _describe(items: Iterable[str], limit: int = 30) -> str:
    listed = list(items)
    return "; ".join(listed[:limit]) + (f"; and {len(listed) - limit} more" if len(listed) > limit else "")


def empty(message: str) -> str:
    return f'<p class="empty">{esc(message)}</p>'


def _clip(label: str) -> str:
    return label if len(label) <= _MAX_LABEL else label[: _MAX_LABEL - 1] + "…"


def bar_chart(chart: Chart, bars: Sequence[Bar], *, if_empty: str = "Nothing to show yet.") -> str:
    """Horizontal bars (stacked when they have several values) on a value axis from 0 with round ticks; a
    paragraph saying ``if_empty`` when there are none."""
    if not bars:
        return empty(if_empty)
    top = _TITLE_H + (22 if len(chart.series) > 1 else 0) + 6
    bottom = top + 24 * len(bars)
    x0 = min(250.0, 16 + _CHAR_W * max(len(_clip(b.label)) for b in bars))
    x1 = WIDTH - max(40.0, 16 + _CHAR_W * max(len(b.text) for b in bars))
    ticks = covering_ticks(max(sum(b.values) for b in bars), whole=chart.whole)
    scale = (x1 - x0) / ticks[-1]
    grid = "".join(f'<line x1="{x0 + t * scale:.1f}" y1="{top}" x2="{x0 + t * scale:.1f}" y2="{bottom}" '
                   f'stroke="#ddd"/><text x="{x0 + t * scale:.1f}" y="{bottom + 16}" text-anchor="middle">'
                   f"{esc(chart.tick(t))}</text>" for t in ticks)
    shapes = "".join(_bar(chart, bar, x0, top + i * 24, scale) for i, bar in enumerate(bars))
    content = (_legend(chart, _TITLE_H + 14) + f'<g class="axis">{grid}</g><g class="bars">{shapes}</g>'
               f'<line x1="{x0:.1f}" y1="{top}" x2="{x0:.1f}" y2="{bottom}" stroke="#222"/>'
               f'<line x1="{x0:.1f}" y1="{bottom}" x2="{x1:.1f}" y2="{bottom}" stroke="#222"/>'
               f'<text x="{(x0 + x1) / 2:.1f}" y="{bottom + 38}" text-anchor="middle">{esc(chart.axis)}</text>')
    return _svg(chart, bottom + 44, _describe(f"{b.label}: {b.text}" for b in bars), content)


def _bar(chart: Chart, bar: Bar, x0: float, y: float, scale: float) -> str:
    parts, x = [], x0
    for index, value in enumerate(bar.values):
        one = len(bar.values) == 1
        color = bar.color if one and bar.color else chart.colors[index % len(chart.colors)]
        parts.append(f'<rect x="{x:.1f}" y="{y + 4:.1f}" width="{value * scale:.1f}" height="16" fill="{color}" '
                     f'data-value="{esc(bar.exact if one and bar.exact else plain(value))}"/>')
        x += value * scale
    return (f'<g class="bar"><title>{esc(bar.label)}: {esc(bar.text)}</title>'
            f'<text x="{x0 - 6:.1f}" y="{y + 16:.1f}" text-anchor="end">{esc(_clip(bar.label))}</text>'
            f'{"".join(parts)}<text x="{x + 5:.1f}" y="{y + 16:.1f}">{esc(bar.text)}</text></g>')


def histogram(chart: Chart, edges: Sequence[float], counts: Sequence[int], *, unit: str = "jobs",
              if_empty: str = "Nothing to show yet.") -> str:
    """Vertical bars of ``counts`` between consecutive ``edges`` (one more than counts; all equal: one bar
    around that value) on a linear axis with round ticks; ``unit`` names what is counted."""
    if not counts:
        return empty(if_empty)
    lo, hi = edges[0], edges[-1]
    if hi <= lo:
        half = max(abs(lo) * 0.05, 0.5)
        lo, hi, edges = lo - half, lo + half, [lo - half, lo + half]
    x0, x1, y0, y1 = 64.0, WIDTH - 16.0, _TITLE_H + 12.0, 252.0
    yticks = covering_ticks(max(counts), whole=True)

    def x(v: float) -> float:
        return x0 + (x1 - x0) * (v - lo) / (hi - lo)

    def y(v: float) -> float:
        return y1 - (y1 - y0) * v / yticks[-1]

    spans = list(zip(edges, edges[1:], counts, strict=False))
    axes = "".join(f'<line x1="{x0}" y1="{y(t):.1f}" x2="{x1}" y2="{y(t):.1f}" stroke="#ddd"/>'
                   f'<text x="{x0 - 6}" y="{y(t) + 4:.1f}" text-anchor="end">{plain(t)}</text>' for t in yticks)
    axes += "".join(f'<line x1="{x(t):.1f}" y1="{y1}" x2="{x(t):.1f}" y2="{y1 + 4}" stroke="#222"/>'
                    f'<text x="{x(t):.1f}" y="{y1 + 18}" text-anchor="middle">{esc(chart.tick(t))}</text>'
                    for t in inner_ticks(lo, hi))
    bars = "".join(f'<g class="bar"><title>{esc(chart.tick(a))} to {esc(chart.tick(b))}: {n} {esc(unit)}</title>'
                   f'<rect x="{x(a) + 0.5:.1f}" y="{y(n):.1f}" width="{max(x(b) - x(a) - 1, 1):.1f}" '
                   f'height="{y1 - y(n):.1f}" fill="{chart.colors[0]}" data-value="{n}"/></g>' for a, b, n in spans if n)
    content = (f'<g class="axis">{axes}</g><g class="bars">{bars}</g>'
               f'<line x1="{x0}" y1="{y0}" x2="{x0}" y2="{y1}" stroke="#222"/>'
               f'<line x1="{x0}" y1="{y1}" x2="{x1}" y2="{y1}" stroke="#222"/>'
               f'<text x="{(x0 + x1) / 2:.1f}" y="{y1 + 40}" text-anchor="middle">{esc(chart.axis)}</text>'
               f'<text transform="rotate(-90)" x="{-(y0 + y1) / 2:.1f}" y="14" text-anchor="middle">{esc(unit)}</text>')
    return _svg(chart, y1 + 48, _describe(f"{chart.tick(a)} to {chart.tick(b)}: {n} {unit}" for a, b, n in spans),
                content)


# --- tables ------------------------------------------------------------------------------------------------

#: a table cell: what people read, and the exact value for ``data-value`` (None: a text cell)
