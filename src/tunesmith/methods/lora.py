"""The LoRA family through PEFT: LoRA, rsLoRA, DoRA, LoRA+, and PiSSA/OLoRA initialisation.

W x + s * B A x, with A (r x k) the down-projection, B (d x r) the up-projection and s = alpha / r
(alpha / sqrt(r) with rslora). DoRA re-normalises W0 + s B A per output feature and scales it by a
trained magnitude vector m (PEFT implements the paper's formula).
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from ..config import RunConfig
from ..errors import TunesmithError
from .base import PreparedModel, trainable

LORAPLUS_DEFAULT_RATIO = 16.0
INIT = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}


def lora_config(config: RunConfig):
    from peft import LoraConfig

    m = config.method
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=m.r,
        lora_alpha=m.alpha,
        lora_dropout=m.dropout,
        target_modules=m.target_modules,
        use_rslora=m.rslora,
        use_dora=m.name == "dora",
        init_lora_weights=INIT[m.init],
        bias="none",
    )


def wrap_peft(model, peft_config, config: RunConfig):
    from peft import get_peft_model

    try:
        return get_peft_model(model, peft_config)
    except ValueError as exc:
        raise TunesmithError(
            f"method.target_modules = {config.method.target_modules!r} does not fit the model: {exc}. "
            "Use `all-linear` or names such as q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"
        ) from None


def loraplus_ratio(config: RunConfig) -> float | None:
    m = config.method
    if m.loraplus_lr_ratio is not None:
        return m.loraplus_lr_ratio
    return LORAPLUS_DEFAULT_RATIO if m.name == "loraplus" else None


def lora_param_groups(peft_model, ratio: float | None) -> list[dict]:
    """LoRA+ (Hayou et al. 2024): B matrices learn `ratio` times faster than A matrices."""
    params = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    if ratio is None:
        return [{"params": [p for _, p in params], "lr_scale": 1.0}]
    b = [p for n, p in params if "lora_B" in n]
    rest = [p for n, p in params if "lora_B" not in n]
    return [{"params": rest, "lr_scale": 1.0, "name": "lora_A"}, {"params": b, "lr_scale": ratio, "name": "lora_B"}]


def peft_saver(peft_model, initial_adapter: Path | None):
    """PiSSA/OLoRA change the base weights; converting at save makes the adapter apply to the original base."""

    def save(out: Path) -> None:
        if initial_adapter is None:
            peft_model.save_pretrained(out)
            return
        peft_model.save_pretrained(out, path_initial_model_for_weight_conversion=str(initial_adapter))

    return save


def prepare_lora(model, config: RunConfig) -> PreparedModel:
    peft_model = wrap_peft(model, lora_config(config), config)
    initial = None
    if config.method.init in ("pissa", "olora"):
        initial = Path(tempfile.mkdtemp(prefix="tunesmith-initial-adapter-"))
        # PEFT's documented recipe: save the initial adapter marked as plain LoRA init, then convert at the end.
        peft_model.peft_config["default"].init_lora_weights = True
        peft_model.save_pretrained(initial)
        peft_model.peft_config["default"].init_lora_weights = INIT[config.method.init]
    return PreparedModel(
        model=peft_model,
        param_groups=lora_param_groups(peft_model, loraplus_ratio(config)),
        save=peft_saver(peft_model, initial),
        cleanup=(lambda: shutil.rmtree(initial, ignore_errors=True)) if initial else None,
    )


def all_trainable_group(model) -> list[dict]:
    return [{"params": trainable(model), "lr_scale": 1.0}]
