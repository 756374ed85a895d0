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

__all__ = ["ADVICE", "DEFAULT_METHOD", "METHODS", "Method", "frozen_base_dtype", "get_method", "load_kwargs",
           "prepare_model"]


def frozen_base_dtype(config: RunConfig):
    """bf16 for the frozen base of an adapter method when the run computes in bf16, else fp32.

    Under bf16 compute a frozen fp32 weight only ever reaches a matmul as the bf16 copy autocast makes of it
    on every forward, and autograd keeps that copy for the backward pass: storing it in bf16 halves the
    weights and drops the copies (an 8B base: 15 GiB instead of 30). Methods that train the weights
    themselves keep fp32, so the optimizer updates an fp32 weight and the saved model is exact.
    """
    import torch  # heavy: only a caller that loads a model asks

    from ..device import use_bf16

    if get_method(config.method.name).saves_adapter and use_bf16(config.train.bf16):
        return torch.bfloat16
    return torch.float32


def load_kwargs(config: RunConfig) -> dict:
    """from_pretrained arguments for training: the base in `frozen_base_dtype`, plus what the method needs
    (QLoRA: its linears in 4-bit)."""
    return {"dtype": frozen_base_dtype(config), **get_method(config.method.name).load_kwargs(config)}


def prepare_model(model, config: RunConfig, total_steps: int = 0) -> PreparedModel:
    """The method's model, optimizer groups, callbacks and saver; the entry says what the run folder holds.

    Trainable parameters are fp32 whatever the base was loaded in: AdamW's small updates vanish in bf16."""
    import torch  # heavy: called with a model in hand

    entry = get_method(config.method.name)
    prepared = replace(entry.prepare(model, config, total_steps), is_adapter=entry.saves_adapter)
    for p in prepared.model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
    return prepared
