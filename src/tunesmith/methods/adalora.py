"""AdaLoRA: SVD-shaped adapters whose total rank is pruned from init_r toward target_r during training.

No trainer calls the rank allocator for you: a callback runs `update_and_allocate` after every
optimizer step (before the gradients are zeroed, which is when it needs them). PEFT adds the
orthogonality regulariser to the model's loss in training.
"""
from __future__ import annotations

from transformers import TrainerCallback

from ..config import RunConfig
from .base import PreparedModel
from .lora import all_trainable_group, peft_saver, wrap_peft


def adalora_config(config: RunConfig, total_steps: int):
    from peft import AdaLoraConfig

    m = config.method
    tinit = m.tinit
    tfinal = m.tfinal
    if tinit + tfinal >= total_steps:
        # A budget schedule needs room between warm-up and the final phase.
        tinit, tfinal = total_steps // 10, total_steps // 5
    return AdaLoraConfig(
        task_type="CAUSAL_LM",
        init_r=m.init_r,
        target_r=m.target_r,
        tinit=tinit,
        tfinal=tfinal,
        deltaT=m.delta_t,
        total_step=total_steps,
        lora_alpha=m.alpha,
        lora_dropout=m.dropout,
        target_modules=m.target_modules,
        orth_reg_weight=m.orth_reg_weight,
    )


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


def prepare_adalora(model, config: RunConfig, total_steps: int) -> PreparedModel:
    peft_model = wrap_peft(model, adalora_config(config, total_steps), config)
    return PreparedModel(
        model=peft_model,
        param_groups=all_trainable_group(peft_model),
        save=peft_saver(peft_model, None),
        callbacks=[RankAllocationCallback(peft_model)],
    )
