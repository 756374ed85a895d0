"""The sweep folder's files: the manifest (what was swept), sweep.jsonl (one line per finished run) and the
rewritten views (sweep.md, pareto.html).

sweep.jsonl is never appended in place: the whole file is written to a temporary sibling and renamed, so a
crash at any moment leaves either the old lines or the old lines plus the new one, never a torn line.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import TunesmithError
from .grid import canonical

MANIFEST_FILE = "sweep.json"
RESULTS_FILE = "sweep.jsonl"
TABLE_FILE = "sweep.md"
PARETO_FILE = "pareto.html"
RUNS_DIR = "runs"


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def read_rows(folder: Path) -> list[dict]:
    """The finished runs' lines, in the order they finished."""
    path = folder / RESULTS_FILE
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("values"), dict) or "run" not in row:
            raise TunesmithError(f"{path}: line {number} is not a sweep result; remove that line to run it again")
        rows.append(row)
    return rows


def record_row(folder: Path, row: dict) -> list[dict]:
    """Add the line of a run that just finished (replacing an older line for the same values); return all lines."""
    key = canonical(row["values"])
    rows = [r for r in read_rows(folder) if canonical(r["values"]) != key] + [row]
    write_text_atomic(folder / RESULTS_FILE, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return rows


def read_manifest(folder: Path) -> dict | None:
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def write_manifest(folder: Path, manifest: dict) -> None:
    write_text_atomic(folder / MANIFEST_FILE, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
