"""QLoRA: the frozen base in 4-bit NF4 (double-quantized constants) through bitsandbytes, LoRA on top.

On CPU, bitsandbytes repacks 4-bit weights for AVX512-BF16 on the first forward under no_grad
(eval, generate) and afterwards gradients silently stop flowing through those layers. We turn that
repacking off on every Linear4bit before anything runs; tests/test_qlora.py fails if gradients stop.
"""
from __future__ import annotations

import torch

from ..config import RunConfig
from ..errors import TunesmithError
from .base import PreparedModel
from .lora import lora_config, lora_param_groups, loraplus_ratio, peft_saver, wrap_peft


def quantization_config(config: RunConfig):
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


def prepare_qlora(model, config: RunConfig) -> PreparedModel:
    from peft import prepare_model_for_kbit_training

    keep_cpu_gradients_flowing(model)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.train.gradient_checkpointing)
    peft_model = wrap_peft(model, lora_config(config), config)
    keep_cpu_gradients_flowing(peft_model)
    return PreparedModel(
        model=peft_model,
        param_groups=lora_param_groups(peft_model, loraplus_ratio(config)),
        save=peft_saver(peft_model, None),
    )


def dequantized_state_dict(model) -> dict[str, torch.Tensor]:
    """Full-precision weights equal to what the 4-bit layers compute with."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

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
