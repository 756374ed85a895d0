"""Where two skills collide in a merge: per layer, how the models' task vectors relate.

A merge adds task vectors (model - base). Three numbers per decoder layer say why an addition can lose a
skill, each computed over the layer's tensors taken as one vector:

- `cosine` between two task vectors: near 1 they push the same way, near 0 they are independent, below 0
  they undo each other;
- `norms`: each task vector's L2 norm, because in a sum the larger update dominates where both act;
- TIES sign conflicts: after TIES' trim (each tensor's top `density` share by magnitude), `overlap` is the
  share of entries that two or more task vectors keep, and `conflict` the share of those whose kept values
  disagree in sign (the entries TIES' sign election drops from the losing side). Independent random
  vectors conflict on about half of their overlap.

The statistics are pure functions over tensors; `diagnose_plan` reads the task vectors of a merge plan's
inputs one tensor at a time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import combinations
from typing import Iterable, Optional, Sequence

import torch

from .methods import magnitude_trim
from .run import MergePlan, layer_index
from .sources import FullModel

OTHER = "other"  # tensors outside the decoder layers: embeddings, final norm, lm_head


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine between two tensors seen as flattened vectors; 0 when either is zero."""
    a, b = a.reshape(-1).to(torch.float64), b.reshape(-1).to(torch.float64)
    denominator = float(torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b))
    return float(torch.dot(a, b)) / denominator if denominator > 0 else 0.0


def sign_conflicts(deltas: Sequence[torch.Tensor], density: float) -> tuple[int, int]:
    """(overlapping, conflicting) entry counts of TIES-trimmed task vectors of one tensor: entries that two or
    more trimmed vectors keep (non-zero), and those of them holding both a positive and a negative value."""
    kept = torch.stack([magnitude_trim(d, density) for d in deltas])
    overlapping = (kept != 0).sum(0) >= 2
    mixed = (kept > 0).any(0) & (kept < 0).any(0)
    return int(overlapping.sum()), int((overlapping & mixed).sum())


@dataclass
class LayerStats:
    """Running sums over one layer's tensors (dot products and squared norms add up across tensors)."""

    dots: dict[tuple[int, int], float] = field(default_factory=dict)
    squares: list[float] = field(default_factory=list)
    entries: int = 0
    overlapping: int = 0
    conflicting: int = 0

    def add(self, deltas: Sequence[torch.Tensor], density: float) -> None:
        flat = [d.reshape(-1).to(torch.float64) for d in deltas]
        if not self.squares:
            self.squares = [0.0] * len(flat)
        for i, d in enumerate(flat):
            self.squares[i] += float(torch.dot(d, d))
        for i, j in combinations(range(len(flat)), 2):
            self.dots[(i, j)] = self.dots.get((i, j), 0.0) + float(torch.dot(flat[i], flat[j]))
        overlapping, conflicting = sign_conflicts(deltas, density)
        self.entries += deltas[0].numel()
        self.overlapping += overlapping
        self.conflicting += conflicting


@dataclass(frozen=True)
class LayerDiagnosis:
    layer: str  # "0", "1", ... or OTHER
    cosine: float  # the lowest over pairs of models (the pair that collides most)
    norms: tuple[float, ...]  # each model's task-vector norm in this layer
    overlap: float  # share of entries two or more trimmed task vectors keep
    conflict: float  # share of the overlapping entries whose signs disagree
    entries: int  # entries of the layer's changed tensors

    def as_dict(self) -> dict:
        return {"layer": self.layer, "cosine": round(self.cosine, 4), "norms": [round(n, 4) for n in self.norms],
                "overlap": round(self.overlap, 4), "conflict": round(self.conflict, 4)}


def finish(layer: str, stats: LayerStats) -> LayerDiagnosis:
    norms = tuple(math.sqrt(s) for s in stats.squares)
    cosines = [dot / (norms[i] * norms[j]) if norms[i] * norms[j] > 0 else 0.0 for (i, j), dot in stats.dots.items()]
    return LayerDiagnosis(
        layer=layer,
        cosine=min(cosines) if cosines else 1.0,
        norms=norms,
        overlap=stats.overlapping / stats.entries if stats.entries else 0.0,
        conflict=stats.conflicting / stats.overlapping if stats.overlapping else 0.0,
        entries=stats.entries,
    )


def diagnose_tensors(named: Iterable[tuple[str, Sequence[Optional[torch.Tensor]]]], density: float) -> list[LayerDiagnosis]:
    """Per layer, in depth order (then OTHER): `named` yields (tensor name, each model's task vector or None
    for a model that leaves the tensor alone). Tensors no model changes are skipped."""
    layers: dict[str, LayerStats] = {}
    for name, deltas in named:
        present = [d for d in deltas if d is not None]
        if not present:
            continue
        filled = [torch.zeros_like(present[0]) if d is None else d for d in deltas]
        index = layer_index(name)
        layers.setdefault(OTHER if index is None else str(index), LayerStats()).add(filled, density)
    order = sorted(layers, key=lambda k: (k == OTHER, int(k) if k != OTHER else 0))
    return [finish(k, layers[k]) for k in order]


def overall(layers: Sequence[LayerDiagnosis]) -> dict:
    """Whole-model summary: the lowest and the median layer cosine, and the sign-conflict share over every
    overlapping entry of every layer."""
    cosines = sorted(d.cosine for d in layers)
    overlapping = sum(d.overlap * d.entries for d in layers)
    conflicting = sum(d.conflict * d.overlap * d.entries for d in layers)
    return {
        "lowest_cosine": cosines[0] if cosines else 0.0,
        "median_cosine": cosines[len(cosines) // 2] if cosines else 0.0,
        "conflict": conflicting / overlapping if overlapping else 0.0,
    }


def diagnose_plan(plan: MergePlan, density: float) -> list[LayerDiagnosis]:
    """The per-layer diagnosis of a merge plan's inputs (their task vectors against the plan's base)."""
    reference = plan.reference

    def named():
        for name, info in reference.infos.items():
            if not info.dtype.is_floating_point:
                continue
            base = reference.read(name).to(torch.float32)
            yield name, [task_vector(src, name, base) for src in plan.inputs]

    return diagnose_tensors(named(), density)


def task_vector(src, name: str, base: torch.Tensor) -> Optional[torch.Tensor]:
    if isinstance(src, FullModel):
        return src.read(name).to(torch.float32).sub_(base)
    return src.delta(name, lambda: base)
