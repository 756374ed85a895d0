"""Results of `eval` and `eval --forgetting` kept in the run folder they measured, for its report and doctor."""
from __future__ import annotations

import json
from pathlib import Path

from ..doctor.findings import Finding, merge_findings, read_findings, write_findings
from ..rundir import is_run_dir
from .build import write_report


def record_results(target: str | Path, name: str, result: dict) -> Path | None:
    """When `target` is a run folder: write `result` as RUN/<name> (a temporary sibling, then a rename), add its
    doctor findings to doctor.json, and write the report again. A recipe or a model reference is left alone."""
    run = Path(target)
    if not is_run_dir(run):
        return None
    path = run / name
    tmp = run / f".{name}.tmp"
    tmp.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    found = [Finding(**f) for f in result.get("doctor", [])]
    if found:
        write_findings(run, merge_findings(read_findings(run), found))
    return write_report(run)
