"""(IA)^3 through PEFT: one learned vector per adapted layer rescales its output, or, for the MLP's down
projection, its input (Liu et al. 2022). Vectors start at 1, so training starts from the base model.

Non-feed-forward layer: y = l * (W x), l of size d_out. Feed-forward layer (down_proj): y = W (l * x), l of
size d_in. The fewest trainable parameters of any method here; merged exports scale W's rows or columns.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .base import PreparedModel
from .lora import all_trainable_group, peft_saver, wrap_peft
from .method import AdapterBill, AdapterSaves, Method

if TYPE_CHECKING:
    from ..config import RunConfig

FEEDFORWARD = ("down_proj",)  # layers whose input is rescaled (PEFT's default for the Llama family)
NO_RANK = "it trains one scaling vector per adapted layer, which has no rank"


def feedforward_modules(target_modules) -> str | list[str]:
    """The feed-forward layers among the targets, as a pattern over module paths. A list would have to be a
    subset of target_modules, which PEFT saves `all-linear` as full paths: the saved adapter would not load."""
    names = [n for n in FEEDFORWARD if target_modules == "all-linear" or n in target_modules]
    return rf".*\.({'|'.join(names)})" if names else []


def ia3_config(config: RunConfig):
    from peft import IA3Config  # heavy: peft imports torch

    m = config.method
    return IA3Config(task_type="CAUSAL_LM", target_modules=m.target_modules,
                     feedforward_modules=feedforward_modules(m.target_modules))


def prepare_ia3(model, config: RunConfig, total_steps: int = 0) -> PreparedModel:
    peft_model = wrap_peft(model, ia3_config(config), config)
    return PreparedModel(model=peft_model, param_groups=all_trainable_group(peft_model), save=peft_saver(peft_model, None))


def ia3_tensors(r: int, name: str, d_in: int, d_out: int) -> list[int]:
    return [d_in if name in FEEDFORWARD else d_out]


def ia3_saves(a: AdapterSaves) -> tuple[dict[str, int], bool]:
    """PEFT multiplies by the vector: the product keeps the other factor for the vector's gradient, and the
    vector itself when the activation needs a gradient too."""
    feedforward = a.name in FEEDFORWARD
    out = {"(IA)^3 scaling vectors": (a.d_in if feedforward else a.d_out) * 4} if a.input_needs_grad else {}
    if not feedforward:
        return {"(IA)^3 layer outputs": a.tokens * a.d_out * a.act_bytes, **out}, False
    if a.act_bytes == 4:
        return out, True  # x * l keeps x, the layer's input itself
    # bf16 activations: x is cast to the vector's fp32 first, and that copy is what is kept
    return {"(IA)^3 scaled inputs": a.tokens * a.d_in * 4, **out}, False


METHOD = Method(
    name="ia3",
    when="the smallest adapter: one scaling vector per layer, learns fast at a high lr (3e-3), less capacity than lora",
    key_options="target_modules",
    options=("target_modules",),
    prepare=prepare_ia3,
    conflicts={"r": NO_RANK},
    rank_option=None,
    no_rank=NO_RANK,
    lr=3e-3,
    adapter=AdapterBill(formula="d_out, or d_in for down_proj (scaling vector)", tensors=ia3_tensors, saves=ia3_saves),
    warm_imports=("peft",),
)
