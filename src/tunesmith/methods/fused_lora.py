"""LoRA's low-rank branch as one autograd Function that keeps fewer activations than PEFT's module chain.

PEFT computes `lora_B(lora_A(dropout(x))) * s`. Autograd then keeps, per adapted layer, the dropped-out copy
of x (saved by lora_A for its weight gradient) beside the dropout mask. Three projections read the same x
(q, k, v; gate and up read another), so each keeps its own full-size copy. This Function keeps x itself
(shared by every projection that reads it), a one-byte mask and the rank-r activation, and rebuilds the
dropped-out input in backward. Same math, same parameters, same saved adapter: only the forward of PEFT's
`lora.Linear` is swapped, and only while gradients are on (generation and eval run PEFT's own code).

The swap is an instance attribute over PEFT's class method, installed and removed by one handle
(`use_fused_lora`), so a model that is saved or served after training runs PEFT's code untouched. The same
handle gives DoRA layers `fused_dora`'s forward.
"""
from __future__ import annotations

import types
from typing import Callable

import torch

from ..errors import TunesmithError
from .fused_dora import fused_dora_forward, is_fusable_dora
from .fused_parts import INT_OF_SIZE, apply_keep_bits, as_adapter_dtype, keep_bits


class LoraBranch(torch.autograd.Function):
    """base + s * dropout(x) @ A^T @ B^T, with dropout(x) = x * mask / keep.

    The factor s / keep multiplies the rank-r activation, never a full-width tensor, and the sum with the base
    layer's output is the epilogue of one addmm. Backward runs in the dtype forward's matmuls ran in (bf16 under
    autocast, as autograd does for PEFT's layers), so it copies neither x nor the incoming gradient to fp32;
    the weight gradients are returned in the parameters' dtype.
    """

    @staticmethod
    def forward(ctx, x, base, a, b, scale: float, p: float):
        bits, keep = keep_bits(x, p) if p > 0 else (None, 1.0)
        xa = as_adapter_dtype(x, a)
        xm = apply_keep_bits(xa, bits) if bits is not None else xa
        factor = scale / keep
        hs = (xm.reshape(-1, x.shape[-1]) @ a.t()) * factor  # (tokens x r)
        w = b.t()
        if not torch.is_autocast_enabled(x.device.type) and base.dtype != hs.dtype:
            hs, w = hs.to(base.dtype), w.to(base.dtype)
        out = torch.addmm(base.reshape(-1, base.shape[-1]) if base.dim() else base, hs, w)
        ctx.save_for_backward(x, bits.to(torch.int8) if bits is not None else None, hs, a, b)  # 1 byte per entry
        ctx.factor = factor
        return out.view(*x.shape[:-1], b.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x, bits, hs, a, b = ctx.saved_tensors
        dtype = hs.dtype
        if bits is not None:
            bits = bits.to(INT_OF_SIZE[dtype.itemsize])  # widened once, used twice
        g = grad.reshape(-1, grad.shape[-1]).to(dtype)
        gu = (g @ b.to(dtype)) * ctx.factor  # gradient at (x * m) A^T, (tokens x r)
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[3]:
            grad_b = (g.t() @ hs).to(b.dtype)
        if ctx.needs_input_grad[2]:
            xm = x.to(dtype)
            xm = apply_keep_bits(xm, bits) if bits is not None else xm
            grad_a = (gu.t() @ xm.reshape(-1, x.shape[-1])).to(a.dtype)
        if ctx.needs_input_grad[0]:
            grad_x = (gu @ a.to(dtype)).reshape(x.shape)
            if bits is not None:
                grad_x = apply_keep_bits(grad_x, bits)
            grad_x = grad_x.to(x.dtype)
        return grad_x, grad if ctx.needs_input_grad[1] else None, grad_a, grad_b, None, None


def lora_branch(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, p: float = 0.0,
                base: torch.Tensor | None = None) -> torch.Tensor:
    """`base` plus the branch's output (the branch alone when base is None)."""
    zero = torch.zeros((), dtype=a.dtype, device=x.device)
    return LoraBranch.apply(x, zero if base is None else base, a, b, scale, p)


def _fused_forward(self, x, *args, **kwargs):
    """PEFT's lora.Linear.forward for the training case, with each adapter's branch as one LoraBranch."""
    if (
        not torch.is_grad_enabled()
        or self.disable_adapters
        or self.merged
        or kwargs.get("adapter_names") is not None
        or any(name in self.lora_variant for name in self.active_adapters)
    ):
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x, *args, **kwargs)
    for name in self.active_adapters:
        if name not in self.lora_A:
            continue
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        dropout = self.lora_dropout[name]
        p = dropout.p if isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0
        result = lora_branch(x, a, b, self.scaling[name], p, base=result)
    return result


def _fused_svd_forward(self, x, *args, **kwargs):
    """PEFT's AdaLoRA SVDLinear.forward for the training case: the branch x (A * E)^T B^T * scaling / ranknum is
    LoraBranch with A * E as its A (autograd carries that product's gradient to A and E)."""
    if not torch.is_grad_enabled() or self.disable_adapters or self.merged:
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x, *args, **kwargs)
    for name in self.active_adapters:
        if name not in self.lora_A:
            continue
        dropout = self.lora_dropout[name]
        p = dropout.p if isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0
        scale = float(self.scaling[name]) / (float(self.ranknum[name].detach()) + 1e-5)  # a count, never trained
        result = lora_branch(x, self.lora_A[name] * self.lora_E[name], self.lora_B[name], scale, p, base=result)
    return result


_NO_ATTRIBUTE = object()


class FusedLora:
    """The fused forwards installed on a model's plain LoRA and DoRA layers; `remove()`, or leaving a `with` block,
    gives each layer back the forward it had before (PEFT's class method: no instance attribute is left)."""

    def __init__(self, forwards: list[tuple[torch.nn.Module, Callable]]):
        self._before = [(layer, layer.__dict__.get("forward", _NO_ATTRIBUTE)) for layer, _ in forwards]
        for layer, forward in forwards:
            layer.forward = forward

    @property
    def layers(self) -> int:
        return len(self._before)

    def remove(self) -> None:
        for layer, before in self._before:
            if before is _NO_ATTRIBUTE:
                layer.__dict__.pop("forward", None)
            else:
                layer.forward = before
        self._before = []

    def __enter__(self) -> "FusedLora":
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()


def lora_linear_types() -> tuple[type, ...]:
    """PEFT's LoRA layers whose training forward LoraBranch reproduces: full-precision linears and (QLoRA)
    bitsandbytes 4-bit ones, whose base layer saves only the packed weight and adds its output like any base."""
    from peft.tuners.lora.layer import Linear  # heavy: peft imports torch and transformers

    try:
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError:  # bitsandbytes is not installed: there are no 4-bit layers
        return (Linear,)
    return (Linear, Linear4bit)


def use_fused_lora(model: torch.nn.Module) -> FusedLora:
    """Route every plain LoRA linear layer of a PEFT model (full-precision or 4-bit base) and every AdaLoRA one
    through LoraBranch, and every full-precision DoRA one through `fused_dora.DoraBranch`, until the handle is
    removed.

    Checked before anything is swapped, so a refused model is left as it was."""
    from peft.tuners.adalora.layer import SVDLinear

    kinds = lora_linear_types()
    # other variants (and DoRA over 4-bit weights) keep PEFT's forward
    linears = [m for m in model.modules() if type(m) in kinds]
    plain = [m for m in linears if not m.lora_variant]
    dora = [m for m in linears if type(m) is kinds[0] and is_fusable_dora(m)]  # DoRA's norm reads the plain weight
    if any(layer.lora_bias.get(n, False) for layer in plain + dora for n in layer.lora_A):
        raise TunesmithError("train.fused_lora does not support LoRA bias; set train.fused_lora: false")
    svd = [m for m in model.modules() if type(m) is SVDLinear]
    return FusedLora([(m, types.MethodType(_fused_forward, m)) for m in plain]
                     + [(m, fused_dora_forward(m)) for m in dora]
                     + [(m, types.MethodType(_fused_svd_forward, m)) for m in svd])
