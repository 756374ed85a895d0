"""What every method hands the trainer: the model, its optimizer groups, callbacks and how to save it."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # annotations only: method entries import this module, and config.py imports them
    import torch


@dataclass
class PreparedModel:
    model: torch.nn.Module
    # Each group: {"params": [...], "lr_scale": float}; the trainer multiplies the base lr by lr_scale.
    param_groups: list[dict]
    save: Callable[[Path], None]
    callbacks: list = field(default_factory=list)
    # Extra TrainingArguments (GaLore picks its optimizer through them).
    training_args: dict = field(default_factory=dict)
    # Whether the run folder holds an adapter (loaded on top of the base) or a full model; prepare_model
    # sets it from the method's registry entry.
    is_adapter: bool = True
    # Called once the run folder is written (e.g. to remove a temporary initial adapter).
    cleanup: Callable[[], None] | None = None
    # Terms the method adds to the loss, `term(model, inputs, hidden) -> scalar` as MethodTrainer calls them
    # (AdaLoRA's orthogonality regulariser).
    loss_terms: list = field(default_factory=list)


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def save_full_model(model: torch.nn.Module) -> Callable[[Path], None]:
    def save(out: Path) -> None:
        model.save_pretrained(out, safe_serialization=True)

    return save
