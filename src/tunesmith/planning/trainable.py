"""Which parameters a method trains, and how many: the counts every other line of the bill multiplies.

Counts are exact (tests compare them with PEFT's and transformers' own counts).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from ..config import MethodConfig
from ..errors import TunesmithError
from ..methods import get_method
from ..methods.method import AdapterBill, Method
from .spec import LinearSpec, ModelSpec


@dataclass
class Trainability:
    """What a method trains: base parameter names, or its adapter on each targeted linear."""

    entry: Method  # the method's registry entry (methods/<name>.py): its adapter, loss and quantization
    base_names: set[str]
    targets: tuple[LinearSpec, ...] = ()
    r: int = 0
    dropout: bool = False
    adapter_params: int = 0
    detail: str = ""
    fusable: bool = False  # LoRA, DoRA, AdaLoRA, QLoRA: train.fused_lora runs their branches

    @property
    def adapter(self) -> Optional[AdapterBill]:
        return self.entry.adapter

    @property
    def is_adapter(self) -> bool:
        return self.entry.adapter is not None

    def trains(self, name: str) -> bool:
        return name in self.base_names

    def adapted(self, lin: LinearSpec) -> bool:
        return any(t.path == lin.path for t in self.targets)


def target_linears(spec: ModelSpec, target_modules) -> tuple[LinearSpec, ...]:
    """PEFT's matching: `all-linear` is every linear but the lm_head; a name matches a module whose
    dotted path is that name or ends with '.' + name."""
    if target_modules == "all-linear" or target_modules is None:
        return spec.linears
    names = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    chosen = tuple(l for l in spec.linears if any(n == l.name or n == l.path or l.path.endswith("." + n) for n in names))
    if not chosen:
        raise TunesmithError(
            f"method.target_modules = {names!r} matches no linear layer of this model; its linear layers are "
            f"{', '.join(l.name for l in spec.linears)}"
        )
    return chosen


def trainability(spec: ModelSpec, m: MethodConfig) -> Trainability:
    """What `m` trains on this model, by its registry entry's rule; errors name the option that matches nothing."""
    entry = get_method(m.name)
    L = spec.layers
    if entry.adapter is None:
        names, detail = entry.trainable_base([n for n, _ in spec.named_parameters()], L, m)
        return Trainability(entry, names, detail=detail)
    targets = target_linears(spec, m.target_modules)
    r = getattr(m, entry.rank_option) if entry.rank_option else 0
    per_layer = sum(sum(entry.adapter.tensors(r, t.name, t.in_features, t.out_features)) for t in targets)
    rank = f", r={r}" if entry.rank_option else ""
    detail = f"{L} layers x [{', '.join(t.name for t in targets)}]: {entry.adapter.formula} per module{rank}"
    dropout = "dropout" in entry.options and m.dropout > 0
    return Trainability(entry, set(), targets, r, dropout, per_layer * L, detail, fusable=entry.fused_lora)


def adapter_tensors(tr: Trainability) -> list[int]:
    """Sizes of the trainable tensors one decoder layer's adapters add."""
    return [n for t in tr.targets for n in tr.adapter.tensors(tr.r, t.name, t.in_features, t.out_features)]


def lora_count(hidden: int, rank: int, layers: int, modules: int = 1) -> int:
    """The guide's square-matrix formula done right: r x (d + d) per module, per layer."""
    return rank * 2 * hidden * modules * layers


def trainable_tensors(spec: ModelSpec, tr: Trainability) -> list[int]:
    """Sizes of every trainable tensor (what the optimizer keeps states for, one entry per tensor)."""
    if tr.is_adapter:
        return adapter_tensors(tr) * spec.layers
    sizes = dict(spec.named_parameters())
    return [math.prod(sizes[n]) for n in tr.base_names]


def trainable_params(spec: ModelSpec, tr: Trainability) -> int:
    """How many parameters train: what gradients, optimizer states and master copies are sized by."""
    return tr.adapter_params if tr.is_adapter else sum(trainable_tensors(spec, tr))


def trainable_count(spec: ModelSpec, m: MethodConfig) -> int:
    """The exact trainable-parameter count of method `m` on this model (PEFT's own count for adapters)."""
    return trainable_params(spec, trainability(spec, m))


def galore_targets(spec: ModelSpec, m: MethodConfig) -> tuple[LinearSpec, ...]:
    """The matrices GaLore projects (HF optim_target_modules); the others get plain AdamW states."""
    if m.target_modules == "all-linear":
        return spec.linears
    return target_linears(spec, m.target_modules)
