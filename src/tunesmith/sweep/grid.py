"""The grid of a sweep, as pure functions: `--grid KEY=V1,V2` options to combinations, and each combination's name.

A value is typed the way `--set` types it (YAML: `1e-3`, `8`, `true`, `[q_proj, v_proj]`), and a comma inside
brackets or quotes belongs to the value, so `--grid method.target_modules=[q_proj,v_proj],[k_proj]` has two values.
"""
from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import re
from typing import Any, Iterable

from ..errors import TunesmithError
from ..yamlfile import parse_value

Grid = dict[str, list[Any]]  # key path -> its values, in the order given
Combination = dict[str, Any]  # key path -> one value

RESERVED_KEYS = {"output_dir": "the sweep names each run's folder inside --out; set --out instead"}
NAME_LIMIT = 80  # characters of a run folder's name before it is cut and given a hash


def parse_grid(options: Iterable[str]) -> Grid:
    """`["train.lr=1e-4,1e-3", "method.r=8,16"]` -> {"train.lr": ["1e-4", "1e-3"], "method.r": [8, 16]}."""
    grid: Grid = {}
    for option in options:
        key, values = parse_option(option)
        if key in grid:
            raise TunesmithError(f"--grid {key} is given twice; list all its values in one --grid {key}=V1,V2,...")
        grid[key] = values
    if not grid:
        raise TunesmithError("a sweep needs at least one --grid KEY=V1,V2,..., e.g. --grid train.lr=1e-4,1e-3")
    return grid


def parse_option(option: str) -> tuple[str, list[Any]]:
    """One `KEY=V1,V2,...` option: its key and its typed values (none empty, none twice)."""
    if "=" not in option:
        raise TunesmithError(f"--grid '{option}': expected KEY=V1,V2,..., e.g. --grid train.lr=1e-4,1e-3")
    key, text = (part.strip() for part in option.split("=", 1))
    if not key:
        raise TunesmithError(f"--grid '{option}': the key is empty; write KEY=V1,V2,..., e.g. train.lr=1e-4,1e-3")
    pieces = split_values(text)
    if not text or any(not p.strip() for p in pieces):
        raise TunesmithError(f"--grid {key}: an empty value in '{text}'; list one or more values separated by commas, "
                             f"e.g. --grid {key}=V1,V2")
    values = [parse_value(p) for p in pieces]
    seen: list[str] = []
    for p, v in zip(pieces, values):
        canon = canonical(v)
        if canon in seen:
            raise TunesmithError(f"--grid {key}: the value {p.strip()} is listed twice; list each value once")
        seen.append(canon)
    return key, values


def split_values(text: str) -> list[str]:
    """Split at commas outside brackets, braces and quotes."""
    pieces, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth = max(0, depth - 1)
        elif ch == "," and depth == 0:
            pieces.append(text[start:i])
            start = i + 1
    pieces.append(text[start:])
    return pieces


def check_keys(grid: Grid, valid: list[str]) -> None:
    """Every key names a config key (list indices such as `data.train.0` allowed); the sweep's own keys refused."""
    for key in grid:
        if key in RESERVED_KEYS:
            raise TunesmithError(f"--grid {key}: {RESERVED_KEYS[key]}")
        plain = ".".join(part for part in key.split(".") if not part.isdigit())
        if plain not in valid:
            match = difflib.get_close_matches(plain, valid, n=1, cutoff=0.5)
            hint = f"did you mean '{match[0]}'?" if match else "`tunesmith config show RECIPE` lists every key"
            raise TunesmithError(f"--grid {key}: unknown config key; {hint}")


def expand(grid: Grid) -> list[Combination]:
    """Every combination, the last key varying fastest (like nested loops in the order the keys were given)."""
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def canonical(value: Any) -> str:
    """One text per value or combination, for comparing a finished run with a wanted one."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)


def as_overrides(combination: Combination) -> list[str]:
    """The combination as `--set` overrides (values written back as YAML flow text, so they parse to themselves)."""
    return [f"{key}={_yaml_text(value)}" for key, value in combination.items()]


def _yaml_text(value: Any) -> str:
    if isinstance(value, str):
        return value if parse_value(value) == value else json.dumps(value)
    return json.dumps(value)


def run_name(combination: Combination) -> str:
    """A folder name that says the values (`train.lr=1e-4_method.r=8`, a list as `q_proj+v_proj`); a name that had
    to be changed to be safe, cut short, or made from a list carries a hash of the combination, so two
    combinations never share a folder."""
    text = "_".join(f"{key}={_shown(value)}" for key, value in combination.items())
    safe = re.sub(r"[^A-Za-z0-9._=+-]", "-", text)
    plain = all(not isinstance(v, (list, dict)) for v in combination.values())
    if plain and safe == text and len(safe) <= NAME_LIMIT and not safe.startswith("."):
        return safe
    digest = hashlib.sha1(canonical(combination).encode("utf-8")).hexdigest()[:8]
    return f"{safe[:NAME_LIMIT].lstrip('.')}-{digest}"


def _shown(value: Any) -> str:
    if isinstance(value, list):
        return "+".join(_shown(v) for v in value)
    return value if isinstance(value, str) else json.dumps(value)
