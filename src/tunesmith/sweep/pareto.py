"""The trade-off a `--forgetting` sweep shows: task score (higher is better) against the change of general
perplexity (lower is better), and the runs no other run beats on both (the Pareto front).

`pareto_front` is pure; `pareto_page` draws the points as an inline SVG in one self-contained HTML page (no
script, nothing fetched), with the front highlighted and every point listed in a table.
"""
from __future__ import annotations

import math
from html import escape

from ..reporting.svg import COLORS, HEIGHT, PAD_BOTTOM, PAD_LEFT, PAD_RIGHT, PAD_TOP, WIDTH, nice_ticks
from ..reporting.svg import format_tick, plot_frame, linear_scale, svg_element

SCORE, CHANGE = "score", "general_change"


def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """(score, change) a is at least as good as b on both and better on one: score up, change down."""
    return a[0] >= b[0] and a[1] <= b[1] and (a[0] > b[0] or a[1] < b[1])


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates, in the order given (equal points are all kept)."""
    return [i for i, p in enumerate(points) if not any(dominates(q, p) for j, q in enumerate(points) if j != i)]


def front_rows(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """The rows that have both numbers, and those of them on the front."""
    plotted = [r for r in rows if all(_finite(r["metrics"].get(k)) for k in (SCORE, CHANGE))]
    points = [(r["metrics"][SCORE], r["metrics"][CHANGE]) for r in plotted]
    return plotted, [plotted[i] for i in pareto_front(points)]


def scatter(title: str, plotted: list[dict], front: list[dict]) -> str:
    """x: general-perplexity change, y: task score; front points larger and joined, each point titled with its run."""
    if not plotted:
        return ""
    xs = [r["metrics"][CHANGE] for r in plotted]
    ys = [r["metrics"][SCORE] for r in plotted]
    x_lo, x_hi = _padded(min(xs), max(xs))
    y_lo, y_hi = _padded(min(ys), max(ys))
    sx = linear_scale(x_lo, x_hi, PAD_LEFT, WIDTH - PAD_RIGHT)
    sy = linear_scale(y_lo, y_hi, HEIGHT - PAD_BOTTOM, PAD_TOP)
    parts = [plot_frame(title, "general perplexity change (fine-tuned vs base; lower is better)")]
    for t in nice_ticks(y_lo, y_hi):
        parts.append(f'<line class="grid" x1="{PAD_LEFT}" x2="{WIDTH - PAD_RIGHT}" y1="{sy(t):.1f}" y2="{sy(t):.1f}"/>'
                     f'<text class="tick" x="{PAD_LEFT - 4}" y="{sy(t) + 3:.1f}" text-anchor="end">{format_tick(t)}</text>')
    for t in nice_ticks(x_lo, x_hi, 5):
        parts.append(f'<text class="tick" x="{sx(t):.1f}" y="{HEIGHT - PAD_BOTTOM + 13}" text-anchor="middle">{format_tick(t)}</text>')
    ordered = sorted(front, key=lambda r: r["metrics"][CHANGE])
    d = " ".join(f"{'M' if k == 0 else 'L'}{sx(r['metrics'][CHANGE]):.1f},{sy(r['metrics'][SCORE]):.1f}"
                 for k, r in enumerate(ordered))
    parts.append(f'<path class="series front" d="{d}" stroke="{COLORS[1]}"/>')
    on_front = {id(r) for r in front}
    for r in sorted(plotted, key=lambda r: id(r) in on_front):  # the front drawn last, on top
        best = id(r) in on_front
        parts.append(f'<circle class="{"front" if best else "point"}" cx="{sx(r["metrics"][CHANGE]):.1f}" '
                     f'cy="{sy(r["metrics"][SCORE]):.1f}" r="{4 if best else 2.5}" fill="{COLORS[1] if best else COLORS[0]}">'
                     f'<title>{escape(r["run"])}: score {format_tick(r["metrics"][SCORE])}, general change '
                     f'{format_tick(r["metrics"][CHANGE])}{" (Pareto front)" if best else ""}</title></circle>')
    parts.append(f'<text class="legend" x="{WIDTH - PAD_RIGHT - 110}" y="{PAD_TOP - 12}" style="fill: {COLORS[1]}">Pareto front</text>')
    return svg_element(title, parts)


STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #111; }
svg.plot text { font: 11px sans-serif; fill: #333; } svg.plot .title { font-weight: 600; }
svg.plot .axis { stroke: #333; } svg.plot .grid { stroke: #ddd; }
svg.plot path.series { fill: none; stroke-width: 1.5; }
table { border-collapse: collapse; } td, th { border: 1px solid #ccc; padding: 2px 8px; text-align: right; }
td:first-child, th:first-child { text-align: left; } tr.front td { font-weight: 600; }
"""


def pareto_page(title: str, rows: list[dict]) -> str:
    """The whole HTML page: the plot and a table of every plotted run, the front's rows in bold."""
    plotted, front = front_rows(rows)
    on_front = {id(r) for r in front}
    lines = "".join(
        f'<tr class="{"front" if id(r) in on_front else "point"}"><td>{escape(r["run"])}</td>'
        f'<td>{r["metrics"][SCORE]}</td><td>{r["metrics"][CHANGE]}</td><td>{"yes" if id(r) in on_front else ""}</td></tr>'
        for r in plotted)
    body = scatter("task score vs general-perplexity change", plotted, front) if plotted else \
        "<p>No run has both a task score and a general-perplexity change yet.</p>"
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>{escape(title)}</title><style>{STYLE}</style>'
            f'</head><body><h1>{escape(title)}</h1>{body}<table><tr><th>run</th><th>task score</th>'
            f'<th>general perplexity change</th><th>Pareto front</th></tr>{lines}</table></body></html>\n')


def _padded(lo: float, hi: float) -> tuple[float, float]:
    """A range with room around the points, and some width when they all share one value."""
    if hi == lo:
        return lo - 0.5 * (abs(lo) or 1), hi + 0.5 * (abs(hi) or 1)
    margin = 0.05 * (hi - lo)
    return lo - margin, hi + margin


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
