"""Inline SVG plots, drawn here in plain Python: the report needs no plotting library, no script and no network.

Every plot is an <svg class="plot"> whose data lines are <path class="series"> elements; each point carries a
<title> so hovering shows its value."""
from __future__ import annotations

import math
from html import escape

WIDTH, HEIGHT = 520, 220
PAD_LEFT, PAD_RIGHT, PAD_TOP, PAD_BOTTOM = 58, 12, 26, 34
COLORS = ("#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed")


def nice_ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    """About n round tick values covering [lo, hi] (steps of 1, 2 or 5 times a power of ten)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def format_tick(v: float) -> str:
    return f"{v:.4g}"


def linear_scale(lo: float, hi: float, a: float, b: float):
    span = hi - lo or 1.0
    return lambda v: a + (v - lo) / span * (b - a)


def line_chart(title: str, series: dict[str, list[tuple[float, float]]], x_label: str = "step") -> str:
    """One chart of several named series of (x, y) points; non-finite values are left out."""
    clean = {name: [(x, y) for x, y in pts if math.isfinite(x) and math.isfinite(y)] for name, pts in series.items()}
    clean = {name: pts for name, pts in clean.items() if pts}
    if not clean:
        return ""
    xs = [x for pts in clean.values() for x, _ in pts]
    ys = [y for pts in clean.values() for _, y in pts]
    x_lo, x_hi = min(xs), max(xs)
    y_lo, y_hi = min(ys), max(ys)
    if y_hi == y_lo:
        y_lo, y_hi = y_lo - 0.5 * (abs(y_lo) or 1), y_hi + 0.5 * (abs(y_hi) or 1)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    sx = linear_scale(x_lo, x_hi, PAD_LEFT, WIDTH - PAD_RIGHT)
    sy = linear_scale(y_lo, y_hi, HEIGHT - PAD_BOTTOM, PAD_TOP)
    parts = [plot_frame(title, x_label)]
    for t in nice_ticks(y_lo, y_hi):
        parts.append(f'<line class="grid" x1="{PAD_LEFT}" x2="{WIDTH - PAD_RIGHT}" y1="{sy(t):.1f}" y2="{sy(t):.1f}"/>'
                     f'<text class="tick" x="{PAD_LEFT - 4}" y="{sy(t) + 3:.1f}" text-anchor="end">{format_tick(t)}</text>')
    for t in nice_ticks(x_lo, x_hi, 5):
        parts.append(f'<text class="tick" x="{sx(t):.1f}" y="{HEIGHT - PAD_BOTTOM + 13}" text-anchor="middle">{format_tick(t)}</text>')
    for i, (name, pts) in enumerate(clean.items()):
        color = COLORS[i % len(COLORS)]
        d = " ".join(f"{'M' if k == 0 else 'L'}{sx(x):.1f},{sy(y):.1f}" for k, (x, y) in enumerate(pts))
        if len(pts) == 1:  # a single point still draws: a short horizontal tick
            d += f" L{sx(pts[0][0]) + 4:.1f},{sy(pts[0][1]):.1f}"
        parts.append(f'<path class="series" data-name="{escape(name)}" d="{d}" stroke="{color}"/>')
        parts.extend(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.2" fill="{color}"><title>{escape(name)} at '
                     f'{x_label} {format_tick(x)}: {format_tick(y)}</title></circle>' for x, y in pts)
        parts.append(f'<text class="legend" x="{WIDTH - PAD_RIGHT - 110 * (i + 1)}" y="{PAD_TOP - 12}" fill="{color}">{escape(name)}</text>')
    return svg_element(title, parts)


def histogram(title: str, values: list[float], bins: int = 20, x_label: str = "tokens") -> str:
    """Counts of `values` in `bins` equal-width bins, drawn as one bar outline path."""
    if not values:
        return ""
    lo, hi = min(values), max(values)
    width = (hi - lo) / bins or 1.0
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, int((v - lo) / width))] += 1
    sx = linear_scale(lo, lo + width * bins, PAD_LEFT, WIDTH - PAD_RIGHT)
    sy = linear_scale(0, max(counts), HEIGHT - PAD_BOTTOM, PAD_TOP)
    base = sy(0)
    d, bars = [f"M{sx(lo):.1f},{base:.1f}"], []
    for i, c in enumerate(counts):
        a, b = lo + i * width, lo + (i + 1) * width
        d.append(f"L{sx(a):.1f},{sy(c):.1f} L{sx(b):.1f},{sy(c):.1f}")
        bars.append(f'<rect x="{sx(a):.1f}" y="{sy(c):.1f}" width="{max(sx(b) - sx(a), 0.5):.1f}" height="{base - sy(c):.1f}" '
                    f'class="bar"><title>{format_tick(a)}..{format_tick(b)} {x_label}: {c} examples</title></rect>')
    d.append(f"L{sx(lo + width * bins):.1f},{base:.1f}")
    parts = [plot_frame(title, x_label), *bars, f'<path class="series" d="{" ".join(d)}" stroke="{COLORS[0]}"/>']
    for t in nice_ticks(0, max(counts)):
        parts.append(f'<text class="tick" x="{PAD_LEFT - 4}" y="{sy(t) + 3:.1f}" text-anchor="end">{format_tick(t)}</text>')
    for t in nice_ticks(lo, lo + width * bins, 5):
        parts.append(f'<text class="tick" x="{sx(t):.1f}" y="{HEIGHT - PAD_BOTTOM + 13}" text-anchor="middle">{format_tick(t)}</text>')
    return svg_element(title, parts)


def plot_frame(title: str, x_label: str) -> str:
    return (f'<text class="title" x="{PAD_LEFT}" y="12">{escape(title)}</text>'
            f'<line class="axis" x1="{PAD_LEFT}" x2="{PAD_LEFT}" y1="{PAD_TOP}" y2="{HEIGHT - PAD_BOTTOM}"/>'
            f'<line class="axis" x1="{PAD_LEFT}" x2="{WIDTH - PAD_RIGHT}" y1="{HEIGHT - PAD_BOTTOM}" y2="{HEIGHT - PAD_BOTTOM}"/>'
            f'<text class="tick" x="{(PAD_LEFT + WIDTH - PAD_RIGHT) / 2}" y="{HEIGHT - 4}" text-anchor="middle">{escape(x_label)}</text>')


def svg_element(title: str, parts: list[str]) -> str:
    return (f'<svg class="plot" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" '
            f'height="{HEIGHT}" role="img" aria-label="{escape(title)}">{"".join(parts)}</svg>')
