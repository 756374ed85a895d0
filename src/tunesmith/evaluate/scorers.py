"""Score a generated answer against a reference; each scorer returns 1.0 or 0.0 for one example."""
from __future__ import annotations

import json
import re


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


def json_match(prediction: str, reference: str) -> float:
    """Equal as JSON values: key order and whitespace do not matter, every key and value must."""
    pred = _first_json(prediction)
    return float(pred is not None and pred == json.loads(reference))


SCORERS = {"exact_match": exact_match, "json_match": json_match, "contains": contains}
