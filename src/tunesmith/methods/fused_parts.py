"""What the fused adapter branches (`fused_lora`, `fused_dora`) share: the int16 dropout keep-bits, and the cast
of a layer's input to the adapter's dtype."""
from __future__ import annotations

import torch


INT_OF_SIZE = {2: torch.int16, 4: torch.int32, 8: torch.int64}


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
    as_int = INT_OF_SIZE[x.element_size()]
    return (x.view(as_int) & (bits if bits.dtype == as_int else bits.to(as_int))).view(x.dtype)


def as_adapter_dtype(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """x in the adapter's dtype, as PEFT casts it; under autocast the matmul picks the dtype itself. The
    Functions save the uncast x, which the layer's other projections share."""
    if x.dtype == a.dtype or torch.is_autocast_enabled(x.device.type):
        return x
    return x.to(a.dtype)
