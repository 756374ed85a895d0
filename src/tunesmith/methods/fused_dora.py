"""DoRA's branch as one autograd Function, with the weight norm assembled from low-rank terms.

PEFT's DoRA layer (peft/tuners/lora/dora.py) computes, per output feature i, with u = dropout(x),
n = ||W0 + s B A|| per row (detached: DoRA paper §4.3) and c = m / n:

    out = result + (c - 1) * z + c * s B A u,   z = W0 u (no bias) with dropout, z = result - bias without

so with dropout it runs the frozen weight a second time, on the dropped-out input (the method's own math).
PEFT builds B A by sending an identity matrix through the adapter and then W0 + s B A, a weight-sized tensor
per layer per step, and autograd keeps the dropped-out input, z, c, s B A u and their products. Here the norm
comes from W0's squared row norms (computed once: W0 is frozen) and r-wide products, and autograd keeps x
(shared by the projections that read it), a one-byte mask, the rank-r activation and one d_out-wide tensor,
z + s B A u, which is all the magnitude's gradient needs. Same math, same parameters, same saved adapter.
With dropout the second pass of W0 (forward and backward) stays: it is PEFT's definition of the layer.
"""
from __future__ import annotations

from typing import Callable

import torch

from .fused_parts import INT_OF_SIZE, apply_keep_bits, as_adapter_dtype, keep_bits


def row_norms_squared(w: torch.Tensor) -> torch.Tensor:
    """||W0_i||^2 per output row, in float64: the large term of `dora_weight_norm`, kept exact."""
    return torch.linalg.vector_norm(w.detach(), dim=1, dtype=torch.float64).square()


def dora_weight_norm(w_sq: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """||W0_i + s (B A)_i|| per output row i, without forming W0 + s B A:

        ||W0_i||^2 + 2 s B_i . (W0 A^T)_i + s^2 B_i (A A^T) B_i^T

    The products are d_out x r and r x r, in the adapter's dtype; the sum is taken in float64 on the d_out
    vector, so their rounding is relative to themselves, not to ||W0_i||^2: while s B A is small next to W0
    (the usual case: m carries the scale) the norm is closer to the exact one than PEFT's fp32 norm of the
    assembled row. Where the update cancels most of W0_i the relative error grows as ||W0_i||^2 / n^2
    times fp32's rounding (tests/test_fused_dora.py measures both). Detached, as PEFT's is."""
    with torch.no_grad(), torch.autocast(w.device.type, enabled=False):
        a, b = a.detach(), b.detach()
        wa = w.to(a.dtype) @ a.t()  # d_out x r
        cross = (b * wa).sum(1, dtype=torch.float64)
        quad = ((b @ (a @ a.t())) * b).sum(1, dtype=torch.float64)
        return (w_sq + 2 * scale * cross + scale * scale * quad).clamp_min(0).sqrt()


class DoraBranch(torch.autograd.Function):
    """PEFT's DoRA output (module docstring) from the base layer's `result`, in one step.

    With y = z + s B A u and d = c - 1 it is result + s B A u + d * y: y is the one d_out-wide tensor saved
    (d m = sum over tokens of g * y / n), and d keeps c's small departures from 1 that bf16 would round away
    (c itself rounds to steps of 1/128 near 1). The s / keep factor multiplies the rank-r activation, as in
    `fused_lora.LoraBranch`. Forward and backward run in the dtype forward's matmuls ran in (bf16 under
    autocast), so the full-width temporaries are that narrow; d and n stay in the magnitude's dtype."""

    @staticmethod
    def forward(ctx, x, result, w, bias, a, b, magnitude, norm, scale: float, p: float):
        bits, keep = keep_bits(x, p) if p > 0 else (None, 1.0)
        xa = as_adapter_dtype(x, a)
        rows = (apply_keep_bits(xa, bits) if bits is not None else xa).reshape(-1, x.shape[-1])
        factor = scale / keep
        hs = (rows @ a.t()) * factor  # s A u, tokens x r
        lora = hs @ b.t()  # s B A u
        flat = result.reshape(-1, result.shape[-1])
        if bits is not None:
            y = torch.addmm(lora, rows, _like(w, rows).t(), alpha=1.0 / keep)  # + W0 u, PEFT's F.linear(u, W0)
        else:
            y = lora + flat  # + result - bias
            if bias is not None:
                y.sub_(bias)
        d = magnitude / norm - 1
        out = lora.add_(flat).addcmul_(y, d)  # computed in d's dtype, written in the matmuls' one
        w_for_x = w if bits is not None and ctx.needs_input_grad[0] else None  # only x's gradient through z reads W0
        keep_words = bits.to(torch.int8) if bits is not None else None  # 1 byte per entry
        ctx.save_for_backward(x, keep_words, hs, y, w_for_x, a, b, d, norm)
        ctx.factor, ctx.keep, ctx.result_dtype = factor, keep, result.dtype
        return out.to(result.dtype).view(*x.shape[:-1], b.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x, bits, hs, y, w, a, b, d, norm = ctx.saved_tensors
        dtype = hs.dtype
        if bits is not None:
            bits = bits.to(INT_OF_SIZE[dtype.itemsize])  # widened once, used twice
        g = grad.reshape(-1, grad.shape[-1]).to(dtype)
        gc = torch.addcmul(g, g, d.to(dtype))  # c * g: the gradient at s B A u (and at result without dropout)
        gu = (gc @ b.to(dtype)) * ctx.factor  # gradient at (x * mask) A^T
        grad_x = grad_result = grad_a = grad_b = grad_m = None
        if ctx.needs_input_grad[5]:
            grad_b = (gc.t() @ hs).to(b.dtype)
        if ctx.needs_input_grad[4]:
            xm = as_adapter_dtype(x, a).to(dtype)
            xm = apply_keep_bits(xm, bits) if bits is not None else xm
            grad_a = (gu.t() @ xm.reshape(-1, x.shape[-1])).to(a.dtype)
        if ctx.needs_input_grad[6]:
            grad_m = ((g * y).sum(0, dtype=torch.float32) / norm).to(d.dtype)  # d out / d m = y / n
        if ctx.needs_input_grad[1]:
            # with dropout, result enters once; without, also through z = result - bias: c in all
            grad_result = (grad if bits is not None else gc.to(ctx.result_dtype)).view(grad.shape)
        if ctx.needs_input_grad[0]:
            gx = gu @ a.to(dtype)
            if bits is not None:
                gx = torch.addmm(gx, g * (d / ctx.keep).to(dtype), w.to(dtype))  # through z = W0 u
                gx = apply_keep_bits(gx.reshape(x.shape), bits)
            grad_x = gx.reshape(x.shape).to(x.dtype)
        return grad_x, grad_result, None, None, grad_a, grad_b, grad_m, None, None, None


def _like(w: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The frozen weight in the input's dtype, as PEFT's `weight.to(x.dtype)`; autocast casts it itself."""
    if w.dtype == rows.dtype or torch.is_autocast_enabled(rows.device.type):
        return w
    return w.to(rows.dtype)


def dora_branch(x: torch.Tensor, result: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
                a: torch.Tensor, b: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor, scale: float,
                p: float = 0.0) -> torch.Tensor:
    """PEFT's DoRA layer output, given the base layer's output `result` on x (bias included)."""
    return DoraBranch.apply(x, result, w, bias, a, b, magnitude, norm, scale, p)


def is_fusable_dora(layer) -> bool:
    """A PEFT LoRA layer whose adapters are all DoRA over a plain weight (not transposed, not quantized),
    whose frozen weight and bias stay frozen."""
    from peft.tuners.lora.variants import DoraLinearVariant  # heavy: peft imports torch and transformers

    base = layer.get_base_layer()
    frozen = not base.weight.requires_grad and (base.bias is None or not base.bias.requires_grad)
    return (bool(layer.lora_variant) and frozen and not layer.fan_in_fan_out and base.weight.dim() == 2
            and all(type(v) is DoraLinearVariant for v in layer.lora_variant.values()))


def fused_dora_forward(layer) -> Callable:
    """PEFT's lora.Linear.forward for one DoRA layer in the training case, each adapter as one DoraBranch;
    W0's squared row norms are computed here, once (W0 is frozen while the forward is installed)."""
    w_sq = row_norms_squared(layer.get_base_layer().weight)
    variants = dict(layer.lora_variant)

    def forward(x, *args, **kwargs):
        active = [name for name in layer.active_adapters if name in layer.lora_A]
        if (
            not torch.is_grad_enabled()
            or layer.disable_adapters
            or layer.merged
            or kwargs.get("adapter_names") is not None
            or any(layer.lora_variant.get(name) is not variants.get(name, False) for name in active)
        ):
            return type(layer).forward(layer, x, *args, **kwargs)
        base = layer.get_base_layer()
        result = layer.base_layer(x, *args, **kwargs)
        for name in active:
            a, b, scale = layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name]
            dropout = layer.lora_dropout[name]
            p = dropout.p if isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0
            magnitude = layer.lora_magnitude_vector[name].weight
            norm = dora_weight_norm(w_sq, base.weight, a, b, scale).to(magnitude.dtype)
            result = dora_branch(x, result, base.weight, base.bias, a, b, magnitude, norm, scale, p)
        return result

    return forward
