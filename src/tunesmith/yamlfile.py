"""Read a YAML file whose top level must be a mapping, with errors that name the file."""
from __future__ import annotations

from pathlib import Path

import yaml

from .errors import TunesmithError


def read_yaml_mapping(path: Path, what: str, keys_hint: str) -> dict:
    if not path.is_file():
        raise TunesmithError(f"{what} '{path}' does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise TunesmithError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise TunesmithError(f"{path}: the top level must be a mapping of keys ({keys_hint}, ...)")
    return raw
