"""LoRA through PEFT: W x + (alpha / r) * B A x, with A (r x k) the down- and B (d x r) the up-projection."""
from __future__ import annotations

from ..config import RunConfig
from ..errors import TunesmithError


def lora_config(config: RunConfig):
    from peft import LoraConfig

    m = config.method
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=m.r,
        lora_alpha=m.alpha,
        lora_dropout=m.dropout,
        target_modules=m.target_modules,
        bias="none",
    )


def prepare_lora(model, config: RunConfig):
    from peft import get_peft_model

    try:
        peft_model = get_peft_model(model, lora_config(config))
    except ValueError as exc:
        raise TunesmithError(
            f"method.target_modules = {config.method.target_modules!r} does not match the model's layers: {exc}. "
            "Use `all-linear` or names such as q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"
        ) from None
    groups = [{"params": [p for p in peft_model.parameters() if p.requires_grad]}]
    return peft_model, groups
