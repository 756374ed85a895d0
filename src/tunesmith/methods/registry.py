"""The registry: every fine-tuning method by name, in the order `tunesmith methods` lists them.

Each method module declares one `METHOD` entry (method.py); adding a method is adding its module and
one line below. The rest of tunesmith asks these entries, never `method.name == ...`.
"""
from __future__ import annotations

from . import adalora, dora, freeze, full, galore, ia3, lora, loraplus, qlora, vera
from .method import Method

ADVICE = ("Start with lora; if the base does not fit, qlora; if lora underfits at your rank, dora or a higher r; "
          "if memory allows and data is large, full or galore.")


def _register(*entries: Method) -> dict[str, Method]:
    registry: dict[str, Method] = {}
    for entry in entries:
        if entry.name in registry:
            raise ValueError(f"method '{entry.name}' is registered twice")
        registry[entry.name] = entry
    return registry


METHODS: dict[str, Method] = _register(
    lora.METHOD,
    dora.METHOD,
    qlora.METHOD,
    vera.METHOD,
    adalora.METHOD,
    loraplus.METHOD,
    full.METHOD,
    freeze.METHOD,
    galore.METHOD,
    ia3.METHOD,
)

DEFAULT_METHOD = lora.METHOD.name  # method.name when a recipe gives none


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method '{name}': use one of {', '.join(METHODS)}") from None


def methods_with(flag: str) -> tuple[str, ...]:
    """Names of the methods whose entry has `flag` set (e.g. `stacks`), in registry order."""
    return tuple(name for name, entry in METHODS.items() if getattr(entry, flag))


def methods_accepting(option: str) -> tuple[str, ...]:
    """Names of the methods that take method.<option>, in registry order."""
    return tuple(name for name, entry in METHODS.items() if option in entry.options)
