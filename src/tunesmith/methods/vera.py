"""VeRA: one pair of frozen random projections shared by every layer; only the scaling vectors train.

delta W = diag(b) B diag(d) A, with A (r x k), B (d_out x r) frozen and shared, and per layer the
vectors d (r) and b (d_out) trained: r + d_out parameters per adapted layer.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .base import PreparedModel
from .lora import all_trainable_group, peft_saver, wrap_peft
from .method import AdapterBill, AdapterSaves, Method

if TYPE_CHECKING:
    from ..config import RunConfig


def vera_config(config: RunConfig):
    from peft import VeraConfig  # heavy: peft imports torch

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


def prepare_vera(model, config: RunConfig, total_steps: int = 0) -> PreparedModel:
    peft_model = wrap_peft(model, vera_config(config), config)
    return PreparedModel(model=peft_model, param_groups=all_trainable_group(peft_model), save=peft_saver(peft_model, None))


def vera_tensors(r: int, name: str, d_in: int, d_out: int) -> list[int]:
    return [r, d_out]  # lambda_d and lambda_b; A and B are shared frozen buffers


def vera_saves(a: AdapterSaves) -> tuple[dict[str, int], bool]:
    """dropout(x) -> x A^T (frozen A) -> * d -> B (frozen) -> * b: saves xA (for d) and the B output (for b)."""
    out = {}
    if a.dropout and a.input_needs_grad:
        out["adapter dropout masks"] = a.tokens * a.d_in * a.mask_bytes
    out["adapter low-rank outputs"] = a.tokens * a.rank * a.act_bytes + a.tokens * a.d_out * a.act_bytes
    return out, False


METHOD = Method(
    name="vera",
    when="many adapters to store or serve: only scaling vectors train (tiny files)",
    key_options="r (256+ typical), d_initial, target_modules",
    options=("r", "dropout", "target_modules", "d_initial"),
    prepare=prepare_vera,
    conflicts={"rslora": "VeRA has no alpha/r scaling to stabilise; it trains scaling vectors"},
    adapter=AdapterBill(formula="r + d_out (scaling vectors d and b)", tensors=vera_tensors, saves=vera_saves),
    warm_imports=("peft",),
)
