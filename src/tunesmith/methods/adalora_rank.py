"""AdaLoRA's rank allocation during training: a Trainer callback (kept apart: it imports transformers).

No trainer calls the rank allocator for you: the callback runs `update_and_allocate` after every
optimizer step (before the gradients are zeroed, which is when it needs them).
"""
from __future__ import annotations

from transformers import TrainerCallback


class RankAllocationCallback(TrainerCallback):
    def __init__(self, peft_model):
        self.peft_model = peft_model
        self.budgets: list[tuple[int, int]] = []

    def on_optimizer_step(self, args, state, control, **kwargs):
        # global_step counts finished steps; this step is about to finish.
        if self.has_budgeting_phase():
            self.peft_model.base_model.update_and_allocate(state.global_step + 1)
        self.budgets.append((state.global_step + 1, total_rank(self.peft_model)))

    def has_budgeting_phase(self) -> bool:
        """PEFT prunes by importance scores gathered before the final phase; with no step before it (a
        one-step run) it has none and fails, so such a run keeps init_r."""
        config = self.peft_model.peft_config["default"]
        return config.total_step - config.tfinal > 1


def total_rank(peft_model) -> int:
    """Ranks still alive: the allocator's rank pattern once it prunes, init_r per layer before that."""
    config = peft_model.peft_config["default"]
    if config.rank_pattern:
        return int(sum(sum(bool(x) for x in keep) for keep in config.rank_pattern.values()))
    layers = sum(1 for _, m in peft_model.named_modules() if hasattr(m, "lora_E") and "default" in m.lora_E)
    return config.init_r * layers
