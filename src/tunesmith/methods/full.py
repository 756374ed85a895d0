"""Full fine-tuning: every weight trains and the run folder holds a whole model."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .base import PreparedModel, save_full_model, trainable
from .method import Method

if TYPE_CHECKING:
    from ..config import RunConfig


def prepare_full(model, config: RunConfig, total_steps: int = 0) -> PreparedModel:
    for p in model.parameters():
        p.requires_grad_(True)
    return PreparedModel(model, [{"params": trainable(model), "lr_scale": 1.0}], save_full_model(model))


METHOD = Method(
    name="full",
    when="large data and memory to spare, or a big domain shift: every weight trains",
    key_options="train.bf16, train.gradient_checkpointing",
    options=(),
    prepare=prepare_full,
    rank_option=None,
    lr=1e-5,
)
