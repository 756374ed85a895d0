"""Attention for padding-free rows without attending across examples, and without the packed row's T x T work.

A padding-free micro batch is one row of several examples. Plain sdpa keeps attention inside each example
with a T x T block-diagonal mask, so it still computes every block off the diagonal and throws it away: with
8 examples that is 8x the attention work. When the collator says where each example starts
(`cu_seq_lens_q`, the same keyword flash-attention's varlen path reads), this runs one causal sdpa call per
example instead: only the diagonal blocks, the fast causal kernel, no mask. Everything else (generation with
a cache, padded batches, no boundaries given) goes to transformers' sdpa unchanged.
"""
from __future__ import annotations

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from ..modeling import causal_lm

NAME = "tunesmith_packed"


def packed_sdpa_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    gqa = query.shape[1] != key.shape[1]  # grouped kv heads go in as they are: no repeated k/v copies to keep
    edges = bounds.tolist()
    outputs = [
        torch.nn.functional.scaled_dot_product_attention(
            query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], dropout_p=dropout, scale=scaling, is_causal=True,
            enable_gqa=gqa,
        )
        for s, e in zip(edges[:-1], edges[1:])
    ]
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)  # one example: no copy to keep
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, packed_sdpa_forward)
AttentionMaskInterface.register(NAME, sdpa_mask)


def use_packed_attention(model: torch.nn.Module) -> str | None:
    """Switch a model that runs sdpa to the packed variant; returns the implementation to restore, or None."""
    lm = causal_lm(model)
    current = getattr(lm.config, "_attn_implementation", None)
    if current != "sdpa":
        return None
    lm.set_attn_implementation(NAME)
    return current


def restore_attention(model: torch.nn.Module, previous: str | None) -> None:
    if previous is not None:
        causal_lm(model).set_attn_implementation(previous)
