"""Read training data from files or hub datasets into plain rows, remembering where each row came from."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from ..errors import TunesmithError
from ..yamlfile import not_utf8

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


@dataclass(frozen=True)
class Row:
    """One data row and where it came from (used in every error message about it)."""

    data: dict[str, Any]
    where: str


def load_rows(source: str | list[str], split: str = "train") -> list[Row]:
    sources = source if isinstance(source, list) else [source]
    rows: list[Row] = []
    for src in sources:
        rows.extend(_load_one(src, split))
    if not rows:
        raise TunesmithError(f"data '{', '.join(sources)}' has no rows: add examples to it")
    return rows


def _load_one(source: str, split: str) -> list[Row]:
    path = Path(source).expanduser()
    if path.suffix.lower() in FILE_SUFFIXES or path.exists():
        if path.is_dir():
            raise TunesmithError(f"data file '{source}' is a folder; point the data at a file inside it "
                                 f"({', '.join(FILE_SUFFIXES)}), or a list of them")
        if not path.is_file():
            raise TunesmithError(f"data file '{source}' does not exist")
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return list(_read_jsonl(path))
        if suffix == ".json":
            return _read_json(path)
        if suffix in (".csv", ".parquet"):
            return _read_with_datasets(path, suffix[1:])
        raise TunesmithError(
            f"data file '{source}': unsupported file type '{path.suffix}'; use one of {', '.join(FILE_SUFFIXES)}"
        )
    return _read_hub(source, split)


def _read_jsonl(path: Path) -> Iterable[Row]:
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise TunesmithError(f"{where}: column {exc.start + 1}: byte 0x{raw[exc.start]:02x} is not UTF-8 text "
                                     "(Latin-1 or Windows-1252?); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TunesmithError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno}); fix or remove this line") from None
            if not isinstance(obj, dict):
                raise TunesmithError(f"{where}: each line must be a JSON object, got {type(obj).__name__}")
            yield Row(obj, where)


def _read_json(path: Path) -> list[Row]:
    try:
        obj = json.loads(_utf8_text(path))
    except json.JSONDecodeError as exc:
        raise TunesmithError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if isinstance(obj, dict):
        lists = [v for v in obj.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise TunesmithError(f"{path}: expected a JSON list of objects (or an object holding one list)")
        obj = lists[0]
    if not isinstance(obj, list):
        raise TunesmithError(f"{path}: expected a JSON list of objects")
    rows = []
    for i, item in enumerate(obj):
        if not isinstance(item, dict):
            raise TunesmithError(f"{path}[{i}]: each item must be a JSON object, got {type(item).__name__}")
        rows.append(Row(item, f"{path}[{i}]"))
    return rows


def _utf8_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TunesmithError(f"{path}: {not_utf8(data, exc)}") from None


def _read_with_datasets(path: Path, kind: str) -> list[Row]:
    from datasets import load_dataset

    if kind == "csv" and sum(1 for line in _utf8_text(path).splitlines() if line.strip()) <= 1:
        return []  # a header and no rows
    try:
        ds = load_dataset(kind, data_files=str(path), split="train")
    except Exception as exc:  # datasets raises many types for a malformed file
        raise TunesmithError(f"{path}: could not be read as {kind}: {exc}") from exc
    # CSV row 1 is the header, so data row i is on line i + 2.
    offset = 2 if kind == "csv" else 0
    return [Row(_decode_nested(dict(r)), f"{path}:{i + offset}" if kind == "csv" else f"{path}[{i}]") for i, r in enumerate(ds)]


LIST_FIELDS = ("messages", "conversations", "history", "prompt", "completion")


def _decode_nested(row: dict) -> dict:
    """CSV cells of the list-valued fields (e.g. a `messages` column) hold JSON; decode those only."""
    out = {}
    for k, v in row.items():
        if k in LIST_FIELDS and isinstance(v, str) and v.startswith("[") and v.endswith("]"):
            try:
                v = json.loads(v)
            except json.JSONDecodeError:
                pass
        out[k] = v
    return out


def _read_hub(source: str, split: str) -> list[Row]:
    from datasets import load_dataset

    try:
        ds = load_dataset(source, split=split)
    except Exception as exc:
        raise TunesmithError(
            f"data '{source}' is not a local file, and loading it as a hub dataset failed "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
            "Check the path, or download the dataset on a machine with network access and point data.train at the file."
        ) from exc
    return [Row(dict(r), f"{source}[{split}][{i}]") for i, r in enumerate(ds)]
