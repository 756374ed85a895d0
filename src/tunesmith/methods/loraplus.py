"""LoRA+ (Hayou et al. 2024): plain LoRA whose B matrices learn `loraplus_lr_ratio` times faster than A.

Plain `lora` takes the same option; this method only makes 16 its default.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .base import PreparedModel
from .lora import LORA_BILL, LORA_OPTIONS, prepare_lora
from .method import Method

if TYPE_CHECKING:
    from ..config import RunConfig

DEFAULT_RATIO = 16.0


def prepare_loraplus(model, config: RunConfig, total_steps: int = 0) -> PreparedModel:
    return prepare_lora(model, config, default_ratio=DEFAULT_RATIO)


METHOD = Method(
    name="loraplus",
    when="LoRA converges slowly: B learns loraplus_lr_ratio times faster than A",
    key_options=f"r, alpha, loraplus_lr_ratio ({DEFAULT_RATIO:g})",
    options=LORA_OPTIONS,
    prepare=prepare_loraplus,
    adapter=LORA_BILL,
    stacks=True,
    fused_lora=True,
    warm_imports=("peft",),
)
