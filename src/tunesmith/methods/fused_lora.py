"""LoRA's low-rank branch as one autograd Function that keeps fewer activations than PEFT's module chain.

PEFT computes `lora_B(lora_A(dropout(x))) * s`. Autograd then keeps, per adapted layer, the dropped-out copy
of x (saved by lora_A for its weight gradient) beside the dropout mask. Three projections read the same x
(q, k, v; gate and up read another), so each keeps its own full-size copy. This Function keeps x itself
(shared by every projection that reads it), a one-byte mask and the rank-r activation, and rebuilds the
dropped-out input in backward. Same math, same parameters, same saved adapter: only the forward of PEFT's
`lora.Linear` is swapped, and only while gradients are on (generation and eval run PEFT's own code).

The swap is an instance attribute over PEFT's class method, installed and removed by one handle
(`use_fused_lora`), so a model that is saved or served after training runs PEFT's code untouched.
"""
from __future__ import annotations

import types

import torch

from ..errors import TunesmithError


_INT_OF_SIZE = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def keep_bits(x: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """A Bernoulli keep-mask for dropout as int16 words (-1 keep, 0 drop), and the keep probability it really
    has.

    Each entry takes 15 of 16 random bits, so the drop probability is p rounded to a multiple of 1/32768
    (0.05 -> 1638/32768) and kept entries are scaled by that exact keep probability: unbiased. One 64-bit draw
    gives four entries (a float draw per entry measured 3x slower), and the comparison is integer arithmetic
    whose sign bit is the mask: with `apply_keep_bits` the mask costs a bitwise AND, where a bool mask through
    `torch.where` measured 4x slower and dropout was 17% of a LoRA step (bench/profile_step.py).
    """
    drop = round(p * 32768)
    words = torch.empty((x.numel() + 3) // 4, dtype=torch.int64, device=x.device).random_(-(2**63), None)
    half = words.view(torch.int16)[: x.numel()].view(x.shape) >> 1  # uniform on [-16384, 16383]
    # (drop - 16385) - half is >= 0 exactly when half + 16384 < drop (a drop), and never overflows int16:
    # an arithmetic shift by 15 turns its sign into 0 (drop) or -1 (keep)
    bits = torch.sub(drop - 16385, half).bitwise_right_shift_(15)
    return bits, 1.0 - drop / 32768


def apply_keep_bits(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """x with dropped entries zeroed: `keep_bits` (any signed integer width; they sign-extend to all-ones or
    zero words of x's width) ANDed with x's bits."""
    as_int = _INT_OF_SIZE[x.element_size()]
    return (x.view(as_int) & (bits if bits.dtype == as_int else bits.to(as_int))).view(x.dtype)


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
        xa = _as(x, a)
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
            bits = bits.to(_INT_OF_SIZE[dtype.itemsize])  # widened once, used twice
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


def _as(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """x in the adapter's dtype, as PEFT casts it; under autocast the matmul picks the dtype itself. The
    Function saves the uncast x, which the layer's other projections share."""
    if x.dtype == a.dtype or torch.is_autocast_enabled(x.device.type):
        return x
    return x.to(a.dtype)


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


_NO_ATTRIBUTE = object()


class FusedLora:
    """The fused forward installed on a model's plain LoRA layers; `remove()`, or leaving a `with` block,
    gives each layer back the forward it had before (PEFT's class method: no instance attribute is left)."""

    def __init__(self, layers: list[torch.nn.Module]):
        self._before = [(layer, layer.__dict__.get("forward", _NO_ATTRIBUTE)) for layer in layers]
        for layer in layers:
            layer.forward = types.MethodType(_fused_forward, layer)

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


def use_fused_lora(model: torch.nn.Module) -> FusedLora:
    """Route every plain LoRA linear layer of a PEFT model through LoraBranch, until the handle is removed.

    Checked before anything is swapped, so a refused model is left as it was."""
    from peft.tuners.lora.layer import Linear

    # DoRA, bitsandbytes and other variants keep PEFT's forward
    layers = [m for m in model.modules() if type(m) is Linear and not m.lora_variant]
    if any(layer.lora_bias.get(n, False) for layer in layers for n in layer.lora_A):
        raise TunesmithError("train.fused_lora does not support LoRA bias; set train.fused_lora: false")
    return FusedLora(layers)
