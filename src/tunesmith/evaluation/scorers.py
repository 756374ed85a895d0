"""Score a generated answer against a reference; each scorer returns 1.0 or 0.0 for one example."""
from __future__ import annotations

import json
import re

from ..errors import TunesmithError


def _normalize(text: str) -> str:
    return " ".join(text.strip().split())


def exact_match(prediction: str, reference: str) -> float:
    return float(_normalize(prediction) == _normalize(reference))


def contains(prediction: str, reference: str) -> float:
    return float(_normalize(reference).lower() in _normalize(prediction).lower())


def _first_json(text: str):
    text = text.strip()
    fenced = re.search(r"```(?:json)?\s*(.*?)```", text, re.S)
    if fenced:
        text = fenced.group(1).strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        start = text.find("{")
        if start < 0:
            return None
        try:
            obj, _ = json.JSONDecoder().raw_decode(text[start:])
            return obj
        except json.JSONDecodeError:
            return None


def _same_json(a, b) -> bool:
    """JSON equality; plain == would call true equal to 1 and false equal to 0 (Python's bool is an int)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_json(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_json(x, y) for x, y in zip(a, b))
    return a == b


def json_match(prediction: str, reference: str) -> float:
    """Equal as JSON values: key order and whitespace do not matter, every key and value (and its type) must."""
    pred = _first_json(prediction)
    return float(pred is not None and _same_json(pred, json.loads(reference)))


def check_references(scorer: str, references: list[str]) -> None:
    """json_match parses every reference as JSON: one that is not is a data error, reported before any generation."""
    if scorer != "json_match":
        return
    for i, ref in enumerate(references, 1):
        try:
            json.loads(ref)
        except json.JSONDecodeError as exc:
            raise TunesmithError(
                f"eval.scorer json_match: the reference answer of eval example {i} is not valid JSON ({exc.msg}): "
                f"{ref[:80]!r}; fix the eval data or set eval.scorer to exact_match or contains"
            ) from None


SCORERS = {"exact_match": exact_match, "json_match": json_match, "contains": contains}
