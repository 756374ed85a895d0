"""VeRA: one pair of frozen random projections shared by every layer; only the scaling vectors train.

delta W = diag(b) B diag(d) A, with A (r x k), B (d_out x r) frozen and shared, and per layer the
vectors d (r) and b (d_out) trained: r + d_out parameters per adapted layer.
"""
from __future__ import annotations

from ..config import RunConfig
from .base import PreparedModel
from .lora import all_trainable_group, peft_saver, wrap_peft


def vera_config(config: RunConfig):
    from peft import VeraConfig

    m = config.method
    return VeraConfig(
        task_type="CAUSAL_LM",
        r=m.r,
        target_modules=m.target_modules,
        vera_dropout=m.dropout,
        d_initial=m.d_initial,
        save_projection=True,
        projection_prng_key=config.train.seed,
    )


def prepare_vera(model, config: RunConfig) -> PreparedModel:
    peft_model = wrap_peft(model, vera_config(config), config)
    return PreparedModel(model=peft_model, param_groups=all_trainable_group(peft_model), save=peft_saver(peft_model, None))
