"""The registry: every training objective by name; `train.objective` in a recipe is one of these keys.

Each objective module declares one `OBJECTIVE` entry (objective.py); adding one is adding its module and
one line below. The rest of tunesmith asks these entries, never `objective == ...`.
"""
from __future__ import annotations

from . import dpo, orpo, sft, simpo
from .objective import Objective


def _register(*entries: Objective) -> dict[str, Objective]:
    registry: dict[str, Objective] = {}
    for entry in entries:
        if entry.name in registry:
            raise ValueError(f"objective '{entry.name}' is registered twice")
        registry[entry.name] = entry
    return registry


OBJECTIVES: dict[str, Objective] = _register(sft.OBJECTIVE, dpo.OBJECTIVE, orpo.OBJECTIVE, simpo.OBJECTIVE)

DEFAULT_OBJECTIVE = sft.OBJECTIVE.name


def get_objective(name: str) -> Objective:
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"unknown objective '{name}': use one of {', '.join(OBJECTIVES)}") from None


def objectives_accepting(option: str) -> tuple[str, ...]:
    return tuple(name for name, entry in OBJECTIVES.items() if option in entry.options)
