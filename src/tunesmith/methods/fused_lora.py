"""LoRA's low-rank branch as one autograd Function that keeps fewer activations than PEFT's module chain.

PEFT computes `lora_B(lora_A(dropout(x))) * s`. Autograd then keeps, per adapted layer, the dropped-out copy
of x (saved by lora_A for its weight gradient) beside the dropout mask. Three projections read the same x
(q, k, v; gate and up read another), so each keeps its own full-size copy. This Function keeps x itself
(shared by every projection that reads it), a one-byte mask and the rank-r activation, and rebuilds the
dropped-out input in backward. Same math, same parameters, same saved adapter: only the forward of PEFT's
`lora.Linear` is swapped, and only while gradients are on (generation and eval run PEFT's own code).
"""
from __future__ import annotations

import types

import torch

from ..errors import TunesmithError


class LoraBranch(torch.autograd.Function):
    """delta = s * dropout(x) @ A^T @ B^T, with dropout(x) = x * mask / (1 - p)."""

    @staticmethod
    def forward(ctx, x, a, b, scale: float, p: float):
        keep = 1.0 - p
        mask = torch.rand_like(x) >= p if p > 0 else None
        xd = x * mask / keep if mask is not None else x
        h = xd @ a.t()
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
        if ctx.needs_input_grad[1]:
            xd = x * mask / ctx.keep if mask is not None else x
            grad_a = gh.t() @ xd.reshape(-1, x.shape[-1]).to(gh.dtype)
        if ctx.needs_input_grad[0]:
            grad_x = (gh @ a).reshape(x.shape)
            if mask is not None:
                grad_x = grad_x * mask / ctx.keep
            grad_x = grad_x.to(x.dtype)
        return grad_x, grad_a, grad_b, None, None


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
        result = result + lora_branch(x.to(a.dtype), a, b, self.scaling[name], p).to(result.dtype)
    return result


def use_fused_lora(model: torch.nn.Module) -> int:
    """Route every plain LoRA linear layer of a PEFT model through LoraBranch; returns how many layers."""
    from peft.tuners.lora.layer import Linear

    count = 0
    for module in model.modules():
        if type(module) is not Linear or module.lora_variant:  # DoRA, bitsandbytes and others keep PEFT's forward
            continue
        if any(module.lora_bias.get(n, False) for n in module.lora_A):
            raise TunesmithError("train.fused_lora does not support LoRA bias; set train.fused_lora: false")
        module.forward = types.MethodType(_fused_forward, module)
        count += 1
    return count
