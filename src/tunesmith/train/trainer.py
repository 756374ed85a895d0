"""The transformers Trainer, with the optimizer built from the method's parameter groups."""
from __future__ import annotations

import torch
from transformers import Trainer


class MethodTrainer(Trainer):
    """Each group's lr is the base lr times its `lr_scale` (LoRA+ gives B matrices a larger one).

    Methods that choose their optimizer through TrainingArguments (GaLore) pass no groups and get
    the Trainer's own optimizer.
    """

    def __init__(self, *args, param_groups: list[dict] | None = None, **kwargs):
        self.param_groups = param_groups or []
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model=None):
        if not self.param_groups or self.optimizer is not None:
            return super().create_optimizer(model)
        args = self.args
        groups = []
        for g in self.param_groups:
            decay = [p for p in g["params"] if p.ndim >= 2]
            no_decay = [p for p in g["params"] if p.ndim < 2]
            lr = args.learning_rate * g.get("lr_scale", 1.0)
            if decay:
                groups.append({"params": decay, "lr": lr, "weight_decay": args.weight_decay})
            if no_decay:
                groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0})
        self.optimizer = torch.optim.AdamW(
            groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
            fused=False, foreach=True,
        )
        return self.optimizer
