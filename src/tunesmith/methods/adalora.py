"""AdaLoRA: SVD-shaped adapters whose total rank is pruned from init_r toward target_r during training.

A callback runs the rank allocation after every optimizer step (adalora_rank.py). PEFT adds the
orthogonality regulariser to the model's loss inside PeftModel.forward, which the selective loss (and preference
scoring) bypasses, so the method brings it as a loss term (adalora_orthogonality.py): the same formula, counted
once per optimizer step whatever the gradient accumulation.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .base import PreparedModel
from .lora import all_trainable_group, lora_saves, lora_tensors, peft_saver, wrap_peft
from .method import AdapterBill, AdapterSaves, Method

if TYPE_CHECKING:
    from ..config import RunConfig


def adalora_config(config: RunConfig, total_steps: int):
    from peft import AdaLoraConfig  # heavy: peft imports torch

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


def prepare_adalora(model, config: RunConfig, total_steps: int = 0) -> PreparedModel:
    from .adalora_orthogonality import AdaLoraOrthogonality  # heavy: torch
    from .adalora_rank import RankAllocationCallback  # heavy: a transformers TrainerCallback

    peft_model = wrap_peft(model, adalora_config(config, max(total_steps, 1)), config)
    return PreparedModel(
        model=peft_model,
        param_groups=all_trainable_group(peft_model),
        save=peft_saver(peft_model, None),
        callbacks=[RankAllocationCallback(peft_model)],
        loss_terms=[AdaLoraOrthogonality(peft_model, config.method.orth_reg_weight)],
    )


def check_budget(m) -> None:
    if m.target_r > m.init_r:
        raise ValueError(f"method.target_r={m.target_r} must not exceed method.init_r={m.init_r}")


def target_r_for_rank(rank: int, defaults) -> dict:
    """`plan --rank R` starts at init_r = R; the target budget must not exceed it."""
    return {"target_r": min(rank, defaults.target_r)}


def adalora_tensors(r: int, name: str, d_in: int, d_out: int) -> list[int]:
    return lora_tensors(r, name, d_in, d_out) + [r]  # A, B and the singular values E


def adalora_saves(a: AdapterSaves) -> tuple[dict[str, int], bool]:
    out, keep_input = lora_saves(a)
    if a.fused or a.input_needs_grad:  # A * E: the fused branch keeps it, PEFT's matmul only for x's gradient
        out["adapter low-rank outputs"] += a.rank * a.d_in * a.act_bytes
    return out, keep_input


METHOD = Method(
    name="adalora",
    when="unsure where rank matters: starts at init_r and prunes toward target_r",
    key_options="init_r, target_r, tinit, tfinal, delta_t, orth_reg_weight",
    options=("alpha", "dropout", "target_modules", "rslora", "init_r", "target_r", "tinit", "tfinal", "delta_t",
             "orth_reg_weight"),
    prepare=prepare_adalora,
    check=check_budget,
    rank_option="init_r",
    rank_extra=target_r_for_rank,
    adapter=AdapterBill(formula="init_r x (d_in + d_out) + init_r", tensors=adalora_tensors, saves=adalora_saves,
                        state_per_param=3, state_what="PEFT's rank allocator: importance, its moving average and "
                        "uncertainty per adapter parameter"),
    fused_lora=True,
    warm_imports=("peft",),
)
