"""O-LoRA (`continual.strategy: o-lora`, Wang et al. 2023): keep a new adapter out of the earlier adapters' subspaces.

penalty = lambda * sum over adapted layers and earlier adapters of ||A_old A_new^T||_F^2. Only A_new gets a
gradient: the earlier adapters are frozen (methods/adapter_stack.py), and A_old is detached besides.
"""
from __future__ import annotations

import torch

from ..errors import TunesmithError
from ..methods.adapter_stack import DEFAULT
from ..loss_terms import micro_batch_share


class OrthogonalityTerm:
    """A MethodTrainer loss term: the O-LoRA penalty, counted once per optimizer step."""

    def __init__(self, model, lam: float):
        self.lam = float(lam)
        self.pairs: list[tuple[torch.Tensor, list[torch.Tensor]]] = []
        for module in model.modules():
            lora_a = getattr(module, "lora_A", None)
            if not isinstance(lora_a, torch.nn.ModuleDict) or DEFAULT not in lora_a:
                continue
            old = [lora_a[k].weight for k in lora_a.keys() if k != DEFAULT]
            if old:
                self.pairs.append((lora_a[DEFAULT].weight, old))
        if not self.pairs:
            raise TunesmithError("continual.strategy=o-lora: no layer has both an earlier and the new adapter; "
                                 "use the same method.target_modules as the earlier runs")

    def penalty(self) -> torch.Tensor:
        total = None
        for new, olds in self.pairs:
            for old in olds:
                part = (old.detach().float() @ new.float().T).pow(2).sum()
                total = part if total is None else total + part
        return self.lam * total

    def __call__(self, model, inputs: dict, hidden) -> torch.Tensor:
        return self.penalty() * micro_batch_share(inputs)
