"""QLoRA: the frozen base in 4-bit NF4 (double-quantized constants) through bitsandbytes, LoRA on top.

On CPU, bitsandbytes repacks 4-bit weights for AVX512-BF16 on the first forward under no_grad
(eval, generate) and afterwards gradients silently stop flowing through those layers. We turn that
repacking off on every Linear4bit before anything runs; tests/test_qlora.py fails if gradients stop.

Export merges the adapter into the de-quantized 4-bit base, so the exported model computes what the
trained one did (not into the original 16/32-bit weights, which the adapter never saw).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import TunesmithError
from .base import PreparedModel
from .lora import LORA_BILL, lora_config, lora_param_groups, peft_saver, wrap_peft
from .method import Method

if TYPE_CHECKING:
    import torch

    from ..config import RunConfig

GALORE_WHY = "GaLore trains full-rank weights, which a frozen 4-bit base cannot hold"


def quantization_config(config: RunConfig):
    import torch  # heavy, like everything below: only a QLoRA run loads it here

    try:
        from transformers import BitsAndBytesConfig
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise TunesmithError("method.name=qlora needs bitsandbytes: pip install 'bitsandbytes>=0.45'") from exc
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=config.method.quant_type,
        bnb_4bit_use_double_quant=config.method.double_quant,
        bnb_4bit_compute_dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32,
        bnb_4bit_quant_storage=torch.uint8,
    )


def load_kwargs(config: RunConfig) -> dict:
    import torch

    kwargs = {"quantization_config": quantization_config(config)}
    if not torch.cuda.is_available():
        kwargs["device_map"] = {"": "cpu"}
    return kwargs


def keep_cpu_gradients_flowing(model) -> int:
    """Disable bitsandbytes' CPU bf16 repacking on every 4-bit layer; return how many layers were touched."""
    import bitsandbytes as bnb

    n = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def prepare_qlora(model, config: RunConfig, total_steps: int = 0) -> PreparedModel:
    from peft import prepare_model_for_kbit_training

    keep_cpu_gradients_flowing(model)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.train.gradient_checkpointing)
    peft_model = wrap_peft(model, lora_config(config), config)
    keep_cpu_gradients_flowing(peft_model)
    return PreparedModel(
        model=peft_model,
        param_groups=lora_param_groups(peft_model, config.method.loraplus_lr_ratio),
        save=peft_saver(peft_model, None),
    )


def dequantized_state_dict(model) -> dict[str, torch.Tensor]:
    """Full-precision weights equal to what the 4-bit layers compute with."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    import torch

    state = {}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            w = module.weight
            state[f"{name}.weight"] = F.dequantize_4bit(w.data, w.quant_state).to(torch.float32)
            if module.bias is not None:
                state[f"{name}.bias"] = module.bias.data.to(torch.float32)
    for name, tensor in model.state_dict().items():
        base = name.rsplit(".", 1)[0]
        if f"{base}.weight" in state or any(k in name for k in ("absmax", "quant_map", "quant_state", "nested_")):
            continue
        state.setdefault(name, tensor.to(torch.float32) if tensor.is_floating_point() else tensor)
    return state


def merge_into_dequantized_base(peft_model, run_dir: str):
    """The run's adapter merged into a full-precision copy of the 4-bit base it was trained on."""
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    base4 = peft_model.get_base_model()
    state = {k.replace(".base_layer", ""): v for k, v in dequantized_state_dict(base4).items() if "lora_" not in k}
    config = base4.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_pre_quantization_dtype", None)
    plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config), dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    real_missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if real_missing or unexpected:
        raise TunesmithError(f"QLoRA export: could not rebuild the base weights (missing {real_missing[:3]}, unexpected {unexpected[:3]})")
    plain.tie_weights()
    return PeftModel.from_pretrained(plain, run_dir).merge_and_unload()


METHOD = Method(
    name="qlora",
    when="the base does not fit in memory at 16/32 bit: 4-bit NF4 base plus LoRA",
    key_options="r, alpha, quant_type, double_quant",
    options=("r", "alpha", "dropout", "target_modules", "rslora", "loraplus_lr_ratio", "quant_type", "double_quant"),
    prepare=prepare_qlora,
    conflicts={
        "init": "PiSSA/OLoRA rewrite the base weights, which are frozen 4-bit tensors in QLoRA",
        **{option: GALORE_WHY for option in ("galore_rank", "update_proj_gap", "galore_scale", "galore_optim")},
    },
    adapter=LORA_BILL,
    load_kwargs=load_kwargs,
    after_load=keep_cpu_gradients_flowing,
    merge=merge_into_dequantized_base,
    quantized_base=True,
    fused_lora=True,
    warm_imports=("peft", "bitsandbytes"),
)
