"""Fine-tuning methods: one module per method, each declaring one registry entry (method.py, registry.py).

An entry says what the method accepts, how it loads and prepares the model, what it saves, how it exports,
what its bill counts and what it combines with; config, plan, train, inference and export ask it. Importing
this package loads no torch: every heavy step is a function of an entry that imports what it needs.
"""
from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from .method import Method
from .registry import ADVICE, DEFAULT_METHOD, METHODS, get_method

if TYPE_CHECKING:
    from ..config import RunConfig
    from .base import PreparedModel

__all__ = ["ADVICE", "DEFAULT_METHOD", "METHODS", "Method", "get_method", "load_kwargs", "prepare_model"]


def load_kwargs(config: RunConfig) -> dict:
    """Extra from_pretrained arguments the method needs (QLoRA loads the base in 4-bit)."""
    return get_method(config.method.name).load_kwargs(config)


def prepare_model(model, config: RunConfig, total_steps: int = 0) -> PreparedModel:
    """The method's model, optimizer groups, callbacks and saver; the entry says what the run folder holds."""
    entry = get_method(config.method.name)
    return replace(entry.prepare(model, config, total_steps), is_adapter=entry.saves_adapter)
