"""`tunesmith doctor RUN`: every finding for a finished or crashed run folder: what the callback wrote to
doctor.json during training and `eval` after it, plus the curve detectors run again over metrics.jsonl."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import TunesmithError
from ..methods.registry import METHODS
from ..rundir import CONFIG_FILE, METRICS_FILE, load_run_config
from .detectors import RunFacts, training_findings
from .findings import Finding, merge_findings, read_findings


def read_metrics(run: Path) -> list[dict]:
    """The rows of metrics.jsonl; a torn last line (a killed run) is skipped."""
    path = Path(run) / METRICS_FILE
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def diagnose(run: str | Path) -> list[Finding]:
    """The findings of `run`, fatal ones first."""
    path = Path(run)
    if not (path / CONFIG_FILE).is_file():
        raise TunesmithError(f"'{run}' is not a tunesmith run folder (no {CONFIG_FILE}); pass the output_dir of a "
                             "`tunesmith train` run")
    config = load_run_config(path)
    t = config.train
    facts = RunFacts(lr=t.lr, adapter=METHODS[config.method.name].saves_adapter, max_grad_norm=t.max_grad_norm)
    stored = read_findings(path)
    found = merge_findings(stored, training_findings(read_metrics(path), facts))
    return sorted(found, key=lambda f: (not f.fatal, f.step if f.step is not None else -1))
