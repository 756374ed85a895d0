"""Validated YAML files with `--set` overrides: run configs and merge specs both load through here.

So both behave the same way: a file that is missing, a folder, not UTF-8, not YAML, not a mapping or that
writes a key twice is one line that names the file (and the line and column); `--set key.path=value` parses its value as YAML and reaches into nested
sections and list entries; a validation error is one line per key naming the key, the bad value and what
is valid, and an unknown key gets a hint or the nearest valid name.
"""
from __future__ import annotations

import copy
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Mapping, Optional, Union

import yaml
from pydantic import BaseModel, BeforeValidator, ValidationError

from .errors import TunesmithError

_SCIENTIFIC = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def _scientific_to_float(value: Any) -> Any:
    """YAML 1.1 reads `1e-4` as a string; accept it as the number the user meant."""
    if isinstance(value, str) and _SCIENTIFIC.match(value.strip()):
        return float(value)
    return value


Number = Annotated[float, BeforeValidator(_scientific_to_float)]


@dataclass(frozen=True)
class YamlSchema:
    """One kind of validated YAML file, and the words its errors use."""

    model: type[BaseModel]
    file_word: str  # names a file that does not exist: "recipe 'x.yaml' does not exist"
    dict_name: str  # names a source given as a dict (or nothing) in errors: "config: ..."
    keys_hint: str  # the top-level keys shown when a file is not a mapping
    hints: Mapping[str, str] = field(default_factory=dict)  # unknown key (its last part) -> advice
    entry_key: Optional[str] = None  # a list entry written as a bare string is short for {entry_key: string}


def load_validated(schema: YamlSchema, source: Union[str, Path, dict, None],
                   overrides: Optional[list[str]] = None) -> tuple[Any, Optional[Path]]:
    """Validate a YAML file (or a dict, or nothing) with the `--set` overrides applied on top.

    Returns the model and the file's folder, which relative paths in it resolve against (None without a
    file). A dict source is copied first, so overrides never change the caller's dict.
    """
    base_dir: Optional[Path] = None
    if source is None:
        raw, name = {}, schema.dict_name
    elif isinstance(source, dict):
        raw, name = copy.deepcopy(source), schema.dict_name
    else:
        path = Path(source)
        raw = read_yaml_mapping(path, schema.file_word, schema.keys_hint)
        name, base_dir = str(path), path.parent
    apply_overrides(raw, overrides or [], schema.entry_key)
    try:
        return schema.model.model_validate(raw), base_dir
    except ValidationError as err:
        raise TunesmithError(validation_message(err, name, schema, overrides or [])) from None


# ---- the file --------------------------------------------------------------------------------------------
def read_yaml_mapping(path: Path, what: str, keys_hint: str) -> dict:
    if path.is_dir():
        raise TunesmithError(f"{what} '{path}' is a folder; pass the {what} file (.yaml) inside it")
    if not path.is_file():
        raise TunesmithError(f"{what} '{path}' does not exist")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TunesmithError(f"{path}: {not_utf8(data, exc)}") from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as exc:
        data_file = path.suffix.lower() in (".jsonl", ".json", ".csv", ".parquet")
        hint = f"; {path.name} looks like a data file: pass the {what} (.yaml) that points at it" if data_file else ""
        raise TunesmithError(f"{path}: not valid YAML: {_yaml_problem(exc)}{hint}") from None
    if not isinstance(raw, dict):
        raise TunesmithError(f"{path}: the top level must be a mapping of keys ({keys_hint}, ...)")
    return raw


def not_utf8(data: bytes, exc: UnicodeDecodeError) -> str:
    """Where a file stops being UTF-8, as a user finds it in an editor: line and column, and the byte."""
    line = data.count(b"\n", 0, exc.start) + 1
    column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
    return (f"line {line}, column {column}: byte 0x{data[exc.start]:02x} is not UTF-8 text (Latin-1 or "
            "Windows-1252?); save the file as UTF-8")


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key written twice in one mapping, instead of silently keeping the last."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark)
            except TypeError:
                continue  # an unhashable key: SafeLoader's own error says so
            if first is not key_node.start_mark:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}' (also at line {first.line + 1}; keep one)",
                    key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's several-line report as one line: the problem and where it is (line and column from 1)."""
    where = lambda mark: f"line {mark.line + 1}, column {mark.column + 1}"  # noqa: E731
    problem, mark = getattr(exc, "problem", None), getattr(exc, "problem_mark", None)
    if not problem or mark is None:
        return " ".join(str(exc).split())
    context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if "'\\t'" in problem:
        problem += " (a tab; indent with spaces)"
    if not context or context_mark is None or where(context_mark) == where(mark):
        return f"{problem} at {where(mark)}"
    return f"{problem} at {where(mark)} ({context} started at {where(context_mark)})"


# ---- --set overrides -------------------------------------------------------------------------------------
def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=1e-4` -> (["train", "lr"], 1e-4); the value is parsed as YAML."""
    if "=" not in text:
        raise TunesmithError(f"--set '{text}': expected KEY=VALUE, e.g. --set train.lr=1e-4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise TunesmithError(f"--set '{text}': the key is empty")
    return key.split("."), parse_value(raw)


def parse_value(raw: str) -> Any:
    """A YAML scalar or list (`1e-4`, `true`, `[q_proj, v_proj]`); anything YAML would reshape stays text."""
    text = raw.strip()
    if not text:
        return ""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return raw
    if isinstance(value, dict):
        return raw  # "Answer: JSON only" is a sentence, not a mapping
    if value is None and text not in ("null", "~", "None"):
        return raw  # "# heading" is text, not a YAML comment
    if isinstance(value, str) and value != text:
        return raw  # YAML dropped part of it (e.g. "... #strict")
    return value


def apply_overrides(raw: dict, overrides: list[str], entry_key: Optional[str] = None) -> dict:
    """Set each `key.path=value` in `raw` (in place, later ones win). Missing sections are made; a number
    in the path indexes a list (`models.1.weight=0.5`), where a bare-string entry becomes {entry_key: it}."""
    for item in overrides:
        keys, value = parse_override(item)
        node: Any = raw
        for key in keys[:-1]:
            node = _section(node, key, item, entry_key)
        if isinstance(node, list):
            node[_index(node, keys[-1], item)] = value
        else:
            node[keys[-1]] = value
    return raw


def _section(node: Union[dict, list], key: str, item: str, entry_key: Optional[str]) -> Union[dict, list]:
    if isinstance(node, list):
        i = _index(node, key, item)
        if entry_key and isinstance(node[i], str):
            node[i] = {entry_key: node[i]}
        child = node[i]
    else:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
    if not isinstance(child, (dict, list)):
        raise TunesmithError(f"--set {item}: '{key}' is a value, not a section")
    return child


def _index(node: list, key: str, item: str) -> int:
    if not key.isdigit() or int(key) >= len(node):
        raise TunesmithError(f"--set {item}: '{key}' is not an index of a list of {len(node)} entries")
    return int(key)


# ---- validation errors -----------------------------------------------------------------------------------
def validation_message(err: ValidationError, source: str, schema: YamlSchema, overrides: list[str] = ()) -> str:
    """One line per problem: `source: key = value is invalid: why` (the reasons of a key's union members
    joined), `source: unknown key 'k'; hint`, `source: key is required`, or a rule across keys as worded.
    A key that a `--set` wrote is blamed on that `--set`, not on the file."""
    problems: dict[tuple[str, str], list[str]] = {}  # insertion order is the order pydantic reported
    values: dict[str, Any] = {}
    for e in err.errors():
        path = key_path(e["loc"])
        if e["type"] == "extra_forbidden":
            problems.setdefault(("line", f"unknown key '{path}'{_unknown_key_hint(path, schema)}"), [])
            continue
        reason = e["msg"].removeprefix("Value error, ")
        if e["type"] == "literal_error":
            reason = f"must be one of {e.get('ctx', {}).get('expected', '')}"
        if not path or (e["type"] == "value_error" and isinstance(e.get("input"), dict)):
            problems.setdefault(("line", reason), [])  # a rule across several keys; the message names them
        elif e["type"] == "missing":
            problems.setdefault(("line", f"{path} is required"), [])
        else:
            values[path] = e.get("input")
            reasons = problems.setdefault(("value", path), [])
            if reason not in reasons:
                reasons.append(reason)
    lines = []
    for (what, text), reasons in problems.items():
        where = _setter(text if what == "value" else _quoted_key(text), overrides) or source
        lines.append(f"{where}: {text}" if what == "line" else
                     f"{where}: {text} = {values[text]!r} is invalid: {'; or '.join(reasons)}")
    return "\n".join(lines)


def _quoted_key(line: str) -> str:
    match = re.match(r"unknown key '([^']*)'", line)
    return match.group(1) if match else ""


def _setter(path: str, overrides: list[str]) -> str:
    """`--set ITEM` for the last override that wrote `path` (or a key inside or above it), else ""."""
    dotted = re.sub(r"\[(\d+)\]", r".\1", path)
    for item in reversed(overrides):
        key = item.split("=", 1)[0].strip()
        if dotted and (key == dotted or key.startswith(dotted + ".") or dotted.startswith(key + ".")):
            return f"--set {item}"
    return ""


def key_path(loc: tuple) -> str:
    """The user's key path, without the union-member tags pydantic adds (`bool`, `literal['auto']`, `list[str]`)."""
    keys: list[str] = []
    for part in loc:
        if isinstance(part, int):
            keys[-1:] = [f"{keys[-1]}[{part}]"] if keys else [f"[{part}]"]
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", part) and part not in ("str", "bool", "int", "float"):
            keys.append(part)
    return ".".join(keys)


def _unknown_key_hint(path: str, schema: YamlSchema) -> str:
    hint = schema.hints.get(path.split(".")[-1])
    if hint:
        return f"; {hint}"
    plain = re.sub(r"\[\d+\]", "", path)
    match = difflib.get_close_matches(plain, field_paths(schema.model), n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else ""


def field_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every key a file may hold, dotted (`data.max_length`; a list of sections as `models.weight`)."""
    paths = []
    for name, info in model.model_fields.items():
        path = f"{prefix}{info.alias or name}"  # `lambda`, not the Python name `lambda_`
        paths.append(path)
        ann = info.annotation
        inner = [a for a in getattr(ann, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)]
        ann = inner[0] if len(inner) == 1 else ann  # Optional[Section], list[Section]
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            paths.extend(field_paths(ann, path + "."))
    return paths
