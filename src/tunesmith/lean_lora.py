"""PEFT's LoRA layers reduced to the ops inference runs, for the length of a generation.

At inference PEFT's `lora.Linear.forward` computes `base(x) + lora_B(lora_A(dropout(x))) * scaling` per active
adapter, but around it checks its arguments, pops keywords, looks each adapter up in four dicts, calls the
identity dropout and three sub-modules: small Python costs that, at one decode step's 210 adapted layers and a
few rows, add up to a tenth of the step. `LeanLora` gives each plain LoRA layer a forward with exactly PEFT's
ops in PEFT's order (`F.linear` is what `nn.Linear` calls) and nothing else, except that a power-of-two scaling
is folded into A (see `folded`): the outputs are bit for bit PEFT's. Like `methods.fused_lora.FusedLora` it
is an instance attribute over PEFT's class method, removed after.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F


def _lean_forward(layer, branches: list[tuple], dtype: torch.dtype, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """PEFT's inference forward for the branches captured at install time; anything unusual goes to PEFT."""
    if args or kwargs or x.dtype != dtype:  # PEFT would cast x or pass keywords on: let it
        return type(layer).forward(layer, x, *args, **kwargs)
    base = layer.base_layer
    result = F.linear(x, base.weight, base.bias)
    for a, a_bias, b, b_bias, scaling in branches:
        delta = F.linear(F.linear(x, a, a_bias), b, b_bias)
        result = result + (delta if scaling is None else delta * scaling)
    return result


def lean_branches(layer) -> list[tuple] | None:
    """(A, A bias, B, B bias, scaling) per active adapter of a PEFT `lora.Linear`, or None where the lean forward
    would not be PEFT's computation: adapters off or merged, a variant (DoRA), dropout that drops, hooks, a base
    layer that is not a plain `nn.Linear` (bitsandbytes), adapter weights in another dtype than the base's."""
    base = layer.base_layer
    if (layer.disable_adapters or layer.merged or type(base) is not torch.nn.Linear
            or _has_hooks(layer) or _has_hooks(base)):
        return None
    branches = []
    for name in layer.active_adapters:
        if name not in layer.lora_A:
            continue
        a, b, dropout = layer.lora_A[name], layer.lora_B[name], layer.lora_dropout[name]
        if (name in layer.lora_variant or a.weight.dtype != base.weight.dtype or any(map(_has_hooks, (a, b, dropout)))
                or (dropout.training and getattr(dropout, "p", 0) > 0)):
            return None
        branches.append(folded(a.weight, a.bias, b.weight, b.bias, layer.scaling[name]))
    return branches


def folded(a: torch.Tensor, a_bias, b: torch.Tensor, b_bias, scaling: float) -> tuple:
    """The branch with `scaling` moved into A when that changes no bit, with None for the multiply it saves.

    Multiplying by a power of two only shifts the exponent, so every product and partial sum of
    `x @ (s A)^T @ B^T` is exactly s times that of `x @ A^T @ B^T`: the same float as PEFT's
    `(x @ A^T @ B^T) * s`, one full-width multiply fewer per layer and step. Kept for s >= 1 (LoRA's usual
    alpha = r or 2r), where no product can newly leave the subnormal range, and without biases (which s scales)."""
    mantissa, _ = math.frexp(scaling)
    if mantissa != 0.5 or scaling < 1 or a_bias is not None or b_bias is not None:
        return a, a_bias, b, b_bias, scaling
    return a * scaling, None, b, None, None


def _has_hooks(module: torch.nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


class LeanLora:
    """The lean forward installed on the LoRA layers it applies to; `remove()`, or leaving a `with` block, gives
    each layer back the forward it had (PEFT's class method: no instance attribute is left)."""

    def __init__(self, model: torch.nn.Module):
        self._layers: list[torch.nn.Module] = []
        for layer in lora_linears(model):
            branches = lean_branches(layer)
            if branches is None or "forward" in layer.__dict__:  # keep what someone else installed
                continue
            self._layers.append(layer)
            # what the forward needs travels with it, so a call still running when `remove()` comes finishes
            layer.forward = functools.partial(_lean_forward, layer, branches, layer.base_layer.weight.dtype)

    @property
    def layers(self) -> int:
        return len(self._layers)

    def remove(self) -> None:
        for layer in self._layers:
            del layer.forward
        self._layers = []

    def __enter__(self) -> "LeanLora":
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()


def lora_linears(model: torch.nn.Module) -> list[torch.nn.Module]:
    """PEFT's plain `lora.Linear` layers of a model; none for a model without PEFT."""
    if not hasattr(model, "peft_config"):
        return []
    from peft.tuners.lora.layer import Linear  # heavy: only a model that already has PEFT layers gets here

    return [m for m in model.modules() if type(m) is Linear]
