"""Fine-tuning methods: each prepares the model and hands the trainer its optimizer groups and saver.

Adding a method means adding a module here and a row in METHODS; the trainer never changes.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import RunConfig
from .base import PreparedModel


@dataclass(frozen=True)
class MethodInfo:
    name: str
    when: str
    options: str


METHODS: dict[str, MethodInfo] = {
    m.name: m
    for m in [
        MethodInfo("lora", "the default: small adapter, near full-tuning quality on most tasks, fits modest memory",
                   "r, alpha, dropout, target_modules, rslora, init (default|gaussian|pissa|olora)"),
        MethodInfo("qlora", "the base does not fit in memory at 16/32 bit: 4-bit NF4 base plus LoRA",
                   "r, alpha, quant_type, double_quant"),
        MethodInfo("dora", "LoRA quality is not enough at low rank: learns magnitude and direction separately",
                   "r, alpha, dropout, target_modules"),
        MethodInfo("loraplus", "LoRA converges slowly: B learns loraplus_lr_ratio times faster than A",
                   "r, alpha, loraplus_lr_ratio (16)"),
        MethodInfo("adalora", "unsure where rank matters: starts at init_r and prunes toward target_r",
                   "init_r, target_r, tinit, tfinal, delta_t, orth_reg_weight"),
        MethodInfo("vera", "many adapters to store or serve: only scaling vectors train (tiny files)",
                   "r (256+ typical), d_initial, target_modules"),
        MethodInfo("full", "large data and memory to spare, or a big domain shift: every weight trains",
                   "train.bf16, train.gradient_checkpointing"),
        MethodInfo("freeze", "cheap partial tuning: only the last K layers or named modules train",
                   "trainable_layers or trainable_modules"),
        MethodInfo("galore", "full-parameter quality with low-rank optimizer memory",
                   "galore_rank, update_proj_gap, galore_scale, galore_optim, target_modules"),
    ]
}


def load_kwargs(config: RunConfig) -> dict:
    """Extra from_pretrained arguments a method needs (QLoRA loads the base in 4-bit)."""
    if config.method.name == "qlora":
        from .qlora import load_kwargs as qlora_kwargs

        return qlora_kwargs(config)
    return {}


def prepare_model(model, config: RunConfig, total_steps: int = 0) -> PreparedModel:
    name = config.method.name
    if name in ("lora", "dora", "loraplus"):
        from .lora import prepare_lora

        return prepare_lora(model, config)
    if name == "qlora":
        from .qlora import prepare_qlora

        return prepare_qlora(model, config)
    if name == "vera":
        from .vera import prepare_vera

        return prepare_vera(model, config)
    if name == "adalora":
        from .adalora import prepare_adalora

        return prepare_adalora(model, config, max(total_steps, 1))
    from .full import prepare_freeze, prepare_full, prepare_galore

    return {"full": prepare_full, "freeze": prepare_freeze, "galore": prepare_galore}[name](model, config)
