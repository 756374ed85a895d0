"""A training objective as one registry entry: what the rest of tunesmith asks about an objective.

An entry is plain data plus one pure loss function over per-sequence numbers (summed completion
log-probs, completion token counts, the reference's log-probs), so `config.py` and the CLI read it
without torch; the loss imports torch when it runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

if TYPE_CHECKING:  # annotations only: config.py imports the entries, and they must not load torch
    import torch


@dataclass
class PairLogps:
    """One micro batch of preference pairs, one entry per pair: the policy's summed completion log-probs
    of the chosen and rejected replies, their completion token counts, and the reference's (when needed)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    ref_chosen: Optional[torch.Tensor] = None
    ref_rejected: Optional[torch.Tensor] = None


@dataclass
class ObjectiveOutput:
    """The micro batch's scalar loss, each pair's implicit rewards, and extra per-objective metrics."""

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    chosen_logps: torch.Tensor  # the log-probs the objective scores (sums for DPO, per-token means for ORPO, SimPO)
    rejected_logps: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class Objective:
    """One objective. `loss(logps, options)` is pure: the same numbers give the same loss and gradient."""

    name: str  # train.objective in a recipe
    when: str  # one line: what it teaches and when to pick it
    preference: bool  # trains on (prompt, chosen, rejected) pairs rather than conversations
    needs_reference: bool = False  # the loss reads the reference model's log-probs
    default_beta: Optional[float] = None
    options: frozenset[str] = frozenset()  # the `preference.*` keys it accepts besides beta
    metrics: tuple[str, ...] = ()  # extra metric names it logs beside rewards/* and logps/*
    loss: Optional[Callable[[PairLogps, Any], ObjectiveOutput]] = None
