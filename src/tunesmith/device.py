"""What the hardware supports: bf16 autocast."""
from __future__ import annotations

import torch


def bf16_supported() -> bool:
    """bf16 autocast pays off on GPUs that support it and on CPUs with AMX tiles.

    On a CPU with only AVX512-BF16 (no AMX) autocast measured slower than fp32 for the built-in
    model (a full forward+backward: 133 vs 214 tokens/s), so `auto` keeps fp32 there.
    """
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def use_bf16(setting) -> bool:
    if setting == "auto":
        return bf16_supported()
    return bool(setting)
