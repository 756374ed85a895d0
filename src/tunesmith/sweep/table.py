"""sweep.md: one row per finished run, its grid values and its metrics as the run's own files wrote them."""
from __future__ import annotations

from typing import Any, Optional

from .metrics import METRICS, Metric


def shown_metrics(rows: list[dict]) -> list[str]:
    """The metrics any row has, in the order METRICS lists them."""
    return [name for name in METRICS if any(name in r["metrics"] for r in rows)]


def cell(value: Any) -> str:
    """A number exactly as stored (no rounding beyond the run's own), anything else as text; `|` escaped."""
    if value is None:
        return ""
    return str(value).replace("|", "\\|")


def sweep_markdown(title: str, keys: list[str], rows: list[dict], metric: Metric, best: Optional[dict],
                   pending: int) -> str:
    names = shown_metrics(rows)
    head = [f"# {title}", "",
            f"Best by {metric.name}, the {metric.label}, {metric.direction}: "
            + (f"**{best['run']}** ({metric.name} {cell(best['metrics'][metric.name])})" if best else "no run has it yet"),
            "", f"{len(rows)} runs finished, {pending} to go.", ""]
    header = ["run", *keys, *names]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        mark = " (best)" if best is not None and r is best else ""
        values = [cell(r["values"].get(k)) for k in keys] + [cell(r["metrics"].get(n)) for n in names]
        lines.append("| " + " | ".join([cell(r["run"]) + mark, *values]) + " |")
    return "\n".join(head + lines) + "\n"
