"""Rows in and out of datagen steps: alpaca-style rows (instruction, input, output) with an `id` and a
`provenance`, read with tunesmith's own loader and written so that no run leaves a half-written file.

Generating steps append to their output one JSON line at a time (flushed), each with a stable id; a rerun
reads what is there, skips those ids and continues. A line cut by a kill is the only thing a rerun removes.
Steps that compute their whole output at once (dedup, filter, select) write a temporary sibling and rename it.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterable

from ..data.loading import load_rows
from ..errors import TunesmithError

FIELDS = ("instruction", "input", "output")


def text_id(*parts: str, prefix: str = "h") -> str:
    """A short id that depends only on the text, so a rerun gives a row the same id."""
    digest = hashlib.sha1("\x00".join(parts).encode("utf-8")).hexdigest()[:12]
    return f"{prefix}{digest}"


def stable_seed(*parts) -> int:
    """A sampling seed from the run seed and a row's place, equal in every process (unlike hash() of a str)."""
    return int(hashlib.sha1(repr(parts).encode("utf-8")).hexdigest()[:8], 16)


def row_id(row: dict) -> str:
    if row.get("id") not in (None, ""):
        return str(row["id"])
    return text_id(*(str(row.get(k) or "") for k in FIELDS))


def read_rows(path: str | Path, *, need_output: bool, what: str = "input file") -> list[dict]:
    """Rows of a data file with string instruction/input/output and an id; a missing field is one error naming
    the line and the fix."""
    path = Path(path)
    if not path.is_file():
        raise TunesmithError(f"{what} '{path}' does not exist")
    rows = []
    for row in load_rows(str(path)):
        data = dict(row.data)
        required = ("instruction", "output") if need_output else ("instruction",)
        for key in required:  # a blank output is for `filter` to drop and count, not an error
            value = data.get(key)
            if not isinstance(value, str) or (key == "instruction" and not value.strip()):
                raise TunesmithError(
                    f"{row.where}: no '{key}' text (row has {sorted(data)}); datagen reads alpaca-style rows with "
                    f"'instruction'{', ' + repr('output') if need_output else ''} and an optional 'input'")
        if not isinstance(data.get("input") or "", str):
            raise TunesmithError(f"{row.where}: 'input' must be text")
        data["input"] = data.get("input") or ""
        data.setdefault("output", "")
        data["id"] = row_id(data)
        rows.append(data)
    seen: dict[str, int] = {}
    for i, data in enumerate(rows):
        if data["id"] in seen:
            data["id"] = f"{data['id']}.{i}"  # identical rows stay distinct inputs
        seen[data["id"]] = i
    return rows


def check_output_path(out: str | Path, inputs: Iterable[str | Path]) -> Path:
    out = Path(out)
    if out.exists() and out.is_dir():
        raise TunesmithError(f"--out '{out}' is a folder; name a .jsonl file, such as {out / 'data.jsonl'}")
    if out.suffix.lower() != ".jsonl":
        raise TunesmithError(f"--out '{out}' must end in .jsonl (datagen writes JSON lines)")
    for src in inputs:
        if Path(src).exists() and Path(src).resolve() == out.resolve():
            raise TunesmithError(f"--out '{out}' is the input file; write to a new file, such as "
                                 f"{out.with_name(out.stem + '.out.jsonl')}")
    return out


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.partial-", dir=path.parent)
    try:
        with open(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_rows(path: Path, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


class AppendLog:
    """An append-only JSONL output that a rerun continues: `existing` holds the rows of earlier runs."""

    def __init__(self, path: Path, step: str):
        self.path = path
        self.step = step
        self.existing = self._read_existing()
        self.ids = {r["id"] for r in self.existing}

    def _read_existing(self) -> list[dict]:
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # a line cut by a kill: drop it, it is re-generated
            with self.path.open("r+b") as fh:
                fh.truncate(end)
        rows = []
        for lineno, line in enumerate(data[:end].decode("utf-8", errors="replace").splitlines(), start=1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if not isinstance(row, dict) or (row.get("provenance") or {}).get("step") != self.step or "id" not in row:
                raise TunesmithError(
                    f"--out '{self.path}':{lineno} is not a row written by `tunesmith datagen {self.step}`, so it "
                    "cannot be continued; choose a new --out file (or delete this one)")
            rows.append(row)
        return rows

    def append(self, row: dict) -> bool:
        """Write one row now; False when a row with its id is already there."""
        return self.append_many([row]) == 1

    def append_many(self, rows: list[dict]) -> int:
        """Write the rows whose ids are new in one write call (flushed on close); how many were written."""
        fresh = []
        for row in rows:
            if row["id"] not in self.ids:
                self.ids.add(row["id"])
                fresh.append(row)
        if fresh:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in fresh))
        return len(fresh)


def provenance(step: str, operator: str, teacher: str | None, source_ids: list[str], round_: int = 0) -> dict:
    return {"step": step, "operator": operator, "round": round_, "teacher": teacher, "source_ids": source_ids}


def passed_step(row: dict, step: str, operator: str, **details) -> dict:
    """The row as a cleaning step writes it: its provenance is this step's record, and the records of the steps
    before it (the generating step's first) move, oldest first, into `history`."""
    earlier = row.get("provenance")
    history = []
    if isinstance(earlier, dict):
        history = list(earlier.get("history") or []) + [{k: v for k, v in earlier.items() if k != "history"}]
    elif earlier is not None:
        history = [earlier]
    return {**row, "provenance": {**provenance(step, operator, None, [row["id"]]), **details, "history": history}}
