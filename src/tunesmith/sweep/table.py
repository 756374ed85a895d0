"""sweep.md: one row per finished run, its grid values and its metrics as the run's own files wrote them."""
from __future__ import annotations

from typing import Any, Optional

from .metrics import METRICS, Metric, Requirement


def shown_metrics(rows: list[dict]) -> list[str]:
    """The metrics any row has, in the order METRICS lists them."""
    return [name for name in METRICS if any(name in r["metrics"] for r in rows)]


def cell(value: Any) -> str:
    """A number exactly as stored (no rounding beyond the run's own), anything else as text; `|` escaped."""
    if value is None:
        return ""
    return str(value).replace("|", "\\|")


def best_line(rows: list[dict], metric: Metric, best: Optional[dict], requirements: tuple[Requirement, ...]) -> str:
    """Which run is best and why; when requirements rule every run out, how close each came."""
    among = f" among the runs with {' and '.join(map(str, requirements))}" if requirements else ""
    head = f"Best by {metric.name}, the {metric.label}, {metric.direction}{among}: "
    if best is not None:
        return head + f"**{best['run']}** ({metric.name} {cell(best['metrics'][metric.name])})"
    if not rows or not requirements:
        return head + "no run has it yet"
    closest = []
    for q in requirements:
        values = [r["metrics"][q.metric.name] for r in rows if q.metric.name in r["metrics"]]
        if values:
            reached = max(values) if q.op == ">=" else min(values)
            closest.append(f"{q.metric.name} reached {cell(reached)} at best")
    return head + "**none**: no finished run meets them (" + "; ".join(closest) + ")"


def sweep_markdown(title: str, keys: list[str], rows: list[dict], metric: Metric, best: Optional[dict],
                   pending: int, requirements: tuple[Requirement, ...] = ()) -> str:
    names = shown_metrics(rows)
    head = [f"# {title}", "", best_line(rows, metric, best, requirements),
            "", f"{len(rows)} runs finished, {pending} to go.", ""]
    header = ["run", *keys, *names]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        mark = " (best)" if best is not None and r is best else ""
        values = [cell(r["values"].get(k)) for k in keys] + [cell(r["metrics"].get(n)) for n in names]
        lines.append("| " + " | ".join([cell(r["run"]) + mark, *values]) + " |")
    return "\n".join(head + lines) + "\n"
