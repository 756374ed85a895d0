"""Supervised fine-tuning: next-token cross-entropy on the answers (training/loss.py computes it)."""
from __future__ import annotations

from .objective import Objective

OBJECTIVE = Objective(
    name="sft",
    when="Teach how to answer from example conversations (the default).",
    preference=False,
)
