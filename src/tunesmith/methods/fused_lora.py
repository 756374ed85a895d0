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


def keep_mask(x: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """A Bernoulli keep-mask for dropout, and the keep probability it really has.

    Each entry compares 16 random bits with a threshold, so the drop probability is p rounded to a multiple of
    1/65536 (0.05 -> 0.0500031) and the kept entries are scaled by that exact keep probability: unbiased. One
    64-bit draw gives four entries; a float draw per entry (torch.rand_like, or bernoulli_) measured 3x slower
    here, and dropout's random numbers were 13% of a LoRA step.
    """
    drop = round(p * 65536)
    words = torch.empty((x.numel() + 3) // 4, dtype=torch.int64, device=x.device).random_(-(2**63), None)
    return words.view(torch.int16)[: x.numel()].view(x.shape) >= drop - 32768, 1.0 - drop / 65536


class LoraBranch(torch.autograd.Function):
    """delta = s * dropout(x) @ A^T @ B^T, with dropout(x) = x * mask / keep."""

    @staticmethod
    def forward(ctx, x, a, b, scale: float, p: float):
        # 1/keep is applied to the rank-r side, never to a full-width tensor: (x * m / k) A^T = ((x * m) A^T) / k
        mask, keep = keep_mask(x, p) if p > 0 else (None, 1.0)
        xa = _as(x, a)
        h = (torch.where(mask, xa, 0.0) if mask is not None else xa) @ a.t()  # where: 4x faster than x * mask
        if mask is not None:
            h = h * (1.0 / keep)
        ctx.save_for_backward(x, mask, h, a, b)
        ctx.scale, ctx.keep = scale, keep
        return (h @ b.t()) * scale

    @staticmethod
    def backward(ctx, grad):
        x, mask, h, a, b = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).to(b.dtype)
        gh = (g @ b) * ctx.scale  # gradient at h, (tokens x r)
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[2]:
            grad_b = (g.t() @ h.reshape(-1, h.shape[-1]).to(g.dtype)) * ctx.scale
        gk = gh * (1.0 / ctx.keep) if mask is not None else gh  # gradient at (x * m) A^T
        if ctx.needs_input_grad[1]:
            xm = x.to(gh.dtype)
            xm = torch.where(mask, xm, 0.0) if mask is not None else xm
            grad_a = gk.t() @ xm.reshape(-1, x.shape[-1])
        if ctx.needs_input_grad[0]:
            grad_x = (gk @ a).reshape(x.shape)
            if mask is not None:
                grad_x = torch.where(mask, grad_x, 0.0)
            grad_x = grad_x.to(x.dtype)
        return grad_x, grad_a, grad_b, None, None


def _as(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """x in the adapter's dtype, as PEFT casts it; under autocast the matmul picks the dtype itself. The
    Function saves the uncast x, which the layer's other projections share."""
    if x.dtype == a.dtype or torch.is_autocast_enabled(x.device.type):
        return x
    return x.to(a.dtype)


def lora_branch(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, p: float = 0.0) -> torch.Tensor:
    return LoraBranch.apply(x, a, b, scale, p)


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
        result = result + lora_branch(x, a, b, self.scaling[name], p).to(result.dtype)
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
