"""Reach inside wrapped models: the causal LM under PEFT, its decoder body and its lm_head."""
from __future__ import annotations

import torch


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers *ForCausalLM under a PeftModel (with the adapter layers injected) or itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def decoder_body(model: torch.nn.Module) -> torch.nn.Module:
    lm = causal_lm(model)
    body = getattr(lm, "model", None)
    if body is None:
        get = getattr(lm, "get_decoder", None)
        body = get() if callable(get) else None
    return body


def supports_selective_loss(model: torch.nn.Module) -> bool:
    """True when logits are exactly lm_head(hidden): no bias, soft-capping or logit scaling to replicate."""
    lm = causal_lm(model)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    config = getattr(lm, "config", None)
    if head is None or decoder_body(model) is None or not isinstance(head, torch.nn.Linear) or head.bias is not None:
        return False
    if getattr(head, "weight", None) is None or head.weight.dim() != 2 or head.weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(config, attr, None) not in (None, 1, 1.0):
            return False
    return True
