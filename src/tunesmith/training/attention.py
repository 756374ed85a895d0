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


SHORT = 160  # examples up to this length take ShortCausalAttention (bench/attention_backends.py)


_BIASES: dict = {}


def _causal_bias(n: int, group: int, device) -> torch.Tensor:
    """0 where a query may look and -inf above the diagonal, for `group` query heads stacked per kv head; cached
    per shape, so the mask costs nothing per call and is added inside the score matmul."""
    key = (n, group, str(device))
    if key not in _BIASES:
        _BIASES[key] = torch.full((n, n), float("-inf"), device=device).triu_(1).repeat(group, 1)
    return _BIASES[key]


def _probabilities(qg, kf, bias, scale: float, lse=None):
    """softmax(scale * q k^T + bias) over (kv_heads, group * n, n), and its logsumexp when not given."""
    scores = torch.baddbmm(bias, qg, kf.transpose(1, 2), alpha=scale)
    if lse is None:
        lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    return scores.sub_(lse).exp_(), lse


class ShortCausalAttention(torch.autograd.Function):
    """Causal attention of one short example, in fp32 batched matmuls: the flash kernel's saved tensors (q, k, v,
    output, logsumexp) and its recompute-in-backward, without its tiling.

    For a ~120-token example the CPU flash kernel's backward ran at a fraction of the batched-matmul rate and was
    17% of a LoRA step; at these lengths the whole (heads x n x n) score matrix is a few hundred KiB, so backward
    rebuilds it in one piece. Grouped kv heads are never repeated: the query heads that share a kv head are
    stacked into one matrix against it. q: (1, heads, n, d); k, v: (1, kv_heads, n, d).
    """

    @staticmethod
    def forward(ctx, q, k, v, scale: float):
        kv_heads, n, d = k.shape[1], k.shape[2], k.shape[3]
        group = q.shape[1] // kv_heads
        probs, lse = _probabilities(q.reshape(kv_heads, group * n, d).float(), k[0].float(),
                                    _causal_bias(n, group, q.device), scale)
        out = torch.bmm(probs, v[0].float()).view(q.shape).to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)  # saves the output itself, so torch.compile can trace this
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        kv_heads, n, d = k.shape[1], k.shape[2], k.shape[3]
        group = q.shape[1] // kv_heads
        qg, kf, vf = q.reshape(kv_heads, group * n, d).float(), k[0].float(), v[0].float()
        g = grad.reshape(kv_heads, group * n, d).float()
        probs, _ = _probabilities(qg, kf, _causal_bias(n, group, q.device), ctx.scale, lse)
        grad_v = torch.bmm(probs.transpose(1, 2), g)
        delta = (g * out.reshape(g.shape).float()).sum(-1, keepdim=True)  # rowsum(dO * O) = rowsum(P * dP)
        ds = torch.bmm(g, vf.transpose(1, 2)).sub_(delta).mul_(probs)
        grad_q = torch.bmm(ds, kf * ctx.scale)
        grad_k = torch.bmm(ds.transpose(1, 2), qg * ctx.scale)
        return (grad_q.view(q.shape).to(q.dtype), grad_k.unsqueeze(0).to(k.dtype), grad_v.unsqueeze(0).to(v.dtype),
                None)


def causal_attention(q, k, v, scale: float | None, dropout: float = 0.0):
    """One example's causal attention: ShortCausalAttention where it is faster, sdpa's kernels elsewhere."""
    n = q.shape[2]
    if n <= SHORT and dropout == 0.0 and q.shape[0] == 1:
        return ShortCausalAttention.apply(q, k, v, scale if scale is not None else q.shape[-1] ** -0.5)
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, dropout_p=dropout, scale=scale, is_causal=True, enable_gqa=q.shape[1] != k.shape[1]
    )


def packed_sdpa_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    edges = bounds.tolist()  # grouped kv heads go in as they are: no repeated k/v copies to keep
    outputs = [
        causal_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], scaling, dropout)
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
