"""LoRA through PEFT, with rsLoRA and PiSSA/OLoRA initialisation; DoRA, LoRA+ and QLoRA build on it.

W x + s * B A x, with A (r x k) the down-projection, B (d x r) the up-projection and s = alpha / r
(alpha / sqrt(r) with rslora).
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from ..errors import TunesmithError
from .base import PreparedModel, trainable
from .method import AdapterBill, AdapterSaves, Method

if TYPE_CHECKING:
    from ..config import RunConfig

INIT = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}
LORA_OPTIONS = ("r", "alpha", "dropout", "target_modules", "rslora", "init", "loraplus_lr_ratio")


def lora_config(config: RunConfig, use_dora: bool = False):
    from peft import LoraConfig  # heavy: peft imports torch

    m = config.method
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=m.r,
        lora_alpha=m.alpha,
        lora_dropout=m.dropout,
        target_modules=m.target_modules,
        use_rslora=m.rslora,
        use_dora=use_dora,
        init_lora_weights=INIT[m.init],
        bias="none",
    )


def wrap_peft(model, peft_config, config: RunConfig):
    from peft import get_peft_model  # heavy: peft imports torch

    try:
        return get_peft_model(model, peft_config)
    except ValueError as exc:
        raise TunesmithError(
            f"method.target_modules = {config.method.target_modules!r} does not fit the model: {exc}. "
            "Use `all-linear` or names such as q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"
        ) from None


def lora_param_groups(peft_model, ratio: Optional[float]) -> list[dict]:
    """LoRA+ (Hayou et al. 2024): B matrices learn `ratio` times faster than A matrices."""
    params = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    if ratio is None:
        return [{"params": [p for _, p in params], "lr_scale": 1.0}]
    b = [p for n, p in params if "lora_B" in n]
    rest = [p for n, p in params if "lora_B" not in n]
    return [{"params": rest, "lr_scale": 1.0, "name": "lora_A"}, {"params": b, "lr_scale": ratio, "name": "lora_B"}]


def peft_saver(peft_model, initial_adapter: Optional[Path]):
    """PiSSA/OLoRA change the base weights; converting at save makes the adapter apply to the original base."""

    def save(out: Path) -> None:
        if initial_adapter is None:
            peft_model.save_pretrained(out)
            return
        peft_model.save_pretrained(out, path_initial_model_for_weight_conversion=str(initial_adapter))

    return save


def prepare_lora(model, config: RunConfig, total_steps: int = 0, use_dora: bool = False,
                 default_ratio: Optional[float] = None) -> PreparedModel:
    """LoRA on `model`; `default_ratio` is the LoRA+ ratio when method.loraplus_lr_ratio is not set."""
    peft_model = wrap_peft(model, lora_config(config, use_dora), config)
    initial = None
    if config.method.init in ("pissa", "olora"):
        initial = Path(tempfile.mkdtemp(prefix="tunesmith-initial-adapter-"))
        # PEFT's documented recipe: save the initial adapter marked as plain LoRA init, then convert at the end.
        peft_model.peft_config["default"].init_lora_weights = True
        peft_model.save_pretrained(initial)
        peft_model.peft_config["default"].init_lora_weights = INIT[config.method.init]
    ratio = config.method.loraplus_lr_ratio if config.method.loraplus_lr_ratio is not None else default_ratio
    return PreparedModel(
        model=peft_model,
        param_groups=lora_param_groups(peft_model, ratio),
        save=peft_saver(peft_model, initial),
        cleanup=(lambda: shutil.rmtree(initial, ignore_errors=True)) if initial else None,
    )


def all_trainable_group(model) -> list[dict]:
    return [{"params": trainable(model), "lr_scale": 1.0}]


def lora_tensors(r: int, name: str, d_in: int, d_out: int) -> list[int]:
    return [r * d_in, d_out * r]  # A and B


def lora_saves(a: AdapterSaves) -> tuple[dict[str, int], bool]:
    """PEFT's chain dropout -> lora_A -> lora_B, or train.fused_lora's one Function per layer."""
    T, out = a.tokens, {}
    if a.fused:
        # x (shared with every projection that reads it), a one-byte mask, A x
        if a.dropout:
            out["adapter dropout masks"] = T * a.d_in
        out["adapter low-rank outputs"] = T * a.rank * a.act_bytes
        return out, True
    if a.dropout:
        out["adapter dropout outputs"] = T * a.d_in * a.act_bytes  # lora_A saves its (dropped-out) input
        if a.input_needs_grad:
            out["adapter dropout masks"] = T * a.d_in * a.mask_bytes
    out["adapter low-rank outputs"] = T * a.rank * a.act_bytes  # lora_B saves A x
    return out, not a.dropout  # without dropout lora_A saves the input itself


LORA_BILL = AdapterBill(formula="r x (d_in + d_out)", tensors=lora_tensors, saves=lora_saves, qv_note=True)

METHOD = Method(
    name="lora",
    when="the default: small adapter, near full-tuning quality on most tasks, fits modest memory",
    key_options="r, alpha, dropout, target_modules, rslora, init (default|gaussian|pissa|olora)",
    options=LORA_OPTIONS,
    prepare=prepare_lora,
    adapter=LORA_BILL,
    stacks=True,
    fused_lora=True,
    warm_imports=("peft",),
)
