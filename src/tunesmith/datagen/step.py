"""Each datagen step declares the columns it reads and writes (distilabel's inputs/outputs), so a file that
lacks them is refused before any teacher request is made, and chained steps fit by construction."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepInfo:
    name: str
    inputs: tuple[str, ...]  # text columns every input row must have
    outputs: tuple[str, ...]  # columns every output row has
    teacher: bool = False  # asks a teacher model
    model: bool = False  # scores with a base model

    @property
    def needs_output(self) -> bool:
        return "output" in self.inputs


ROW_COLUMNS = ("id", "instruction", "input", "output", "provenance")
