"""What a sweep reads from each run folder, and which run is best.

Every number comes from the run's own files (summary.json from training, eval.json from `eval`, forgetting.json
from `eval --forgetting`), copied as written, so the sweep's table says exactly what each run says.
"""
from __future__ import annotations

import difflib
import json
import math
import operator
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import TunesmithError
from ..reporting.build import EVAL_FILE, FORGETTING_FILE
from ..rundir import SUMMARY_FILE


@dataclass(frozen=True)
class Metric:
    name: str
    file: str  # the run's file it is read from
    path: tuple[str, ...]  # keys inside that file
    higher_is_better: bool
    label: str

    @property
    def direction(self) -> str:
        return "higher is better" if self.higher_is_better else "lower is better"


METRICS = {m.name: m for m in (
    Metric("score", EVAL_FILE, ("score",), True, "task score (eval.scorer on the eval data)"),
    Metric("eval_loss", SUMMARY_FILE, ("eval_loss",), False, "eval loss at the end of training"),
    Metric("train_loss", SUMMARY_FILE, ("train_loss",), False, "mean training loss"),
    Metric("perplexity", EVAL_FILE, ("perplexity",), False, "perplexity on the eval answers"),
    Metric("general_change", FORGETTING_FILE, ("general", "relative_change"), False,
           "relative change of general perplexity, fine-tuned vs base"),
    Metric("general_perplexity", FORGETTING_FILE, ("general", "perplexity"), False, "general perplexity"),
    Metric("train_seconds", SUMMARY_FILE, ("train_seconds",), False, "training time"),
)}
# With --forgetting the task score is measured by `eval --forgetting` (forgetting.json), not by a separate `eval`.
FORGETTING_SCORE = ("task", "score")


def get_metric(name: str) -> Metric:
    if name not in METRICS:
        match = difflib.get_close_matches(name, list(METRICS), n=1, cutoff=0.5)
        hint = f"did you mean '{match[0]}'? " if match else ""
        raise TunesmithError(f"--metric {name}: unknown metric; {hint}choose one of {', '.join(METRICS)}")
    return METRICS[name]


def default_metric(scored: bool) -> Metric:
    """The task score when the runs are scored (the recipe has eval data), else the eval loss."""
    return METRICS["score" if scored else "eval_loss"]


def read_metrics(run: Path, forgetting: bool) -> dict:
    """Every metric the run's files hold; a file that is missing leaves its metrics out."""
    files = {name: _read_json(run / name) for name in (SUMMARY_FILE, EVAL_FILE, FORGETTING_FILE)}
    found = {}
    for metric in METRICS.values():
        path = FORGETTING_SCORE if forgetting and metric.name == "score" else metric.path
        source = files[FORGETTING_FILE if forgetting and metric.name == "score" else metric.file]
        value = _dig(source, path)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            found[metric.name] = value
    return found


@dataclass(frozen=True)
class Requirement:
    """`--require METRIC>=VALUE` (or <=): what a run must keep to be named best, e.g. score>=0.93."""

    metric: Metric
    op: str
    value: float

    def met(self, row: dict) -> bool:
        got = row["metrics"].get(self.metric.name)
        return _finite(got) and {">=": operator.ge, "<=": operator.le}[self.op](got, self.value)

    def __str__(self) -> str:
        return f"{self.metric.name} {self.op} {self.value:g}"


REQUIREMENT = re.compile(r"^\s*([a-z_]+)\s*(>=|<=)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")


def parse_requirement(text: str) -> Requirement:
    m = REQUIREMENT.match(text)
    if not m:
        raise TunesmithError(f"--require '{text}': write METRIC>=VALUE or METRIC<=VALUE, e.g. --require score>=0.93")
    name, op, value = m.groups()
    if name not in METRICS:
        match = difflib.get_close_matches(name, list(METRICS), n=1, cutoff=0.5)
        hint = f"did you mean '{match[0]}'? " if match else ""
        raise TunesmithError(f"--require '{text}': unknown metric {name}; {hint}choose one of {', '.join(METRICS)}")
    return Requirement(METRICS[name], op, float(value))


def summary_complete(run: Path) -> bool:
    """A run whose training finished: its summary.json exists and parses."""
    return isinstance(_read_json(run / SUMMARY_FILE), dict)


def best_row(rows: list[dict], metric: Metric, requirements: tuple[Requirement, ...] = ()) -> Optional[dict]:
    """Among the rows that meet every requirement, the one with the best finite value of `metric` (the first of
    equals), or None when no row qualifies."""
    candidates = [r for r in rows if _finite(r["metrics"].get(metric.name)) and all(q.met(r) for q in requirements)]
    if not candidates:
        return None
    sign = 1 if metric.higher_is_better else -1
    return max(candidates, key=lambda r: sign * r["metrics"][metric.name])


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _dig(obj, path: tuple[str, ...]):
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj
