"""`tunesmith.export(run)`: a plain Hugging Face folder that loads without tunesmith or PEFT."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from .errors import TunesmithError
from .inference import load_for_inference, stop_token_ids
from .outdir import check_target, inputs, model_input, staged
from .rundir import CONFIG_FILE, is_adapter_run, is_run_dir, load_run_config


def export(run_dir: str, out: str, merge: bool = True, overwrite: bool = False) -> Path:
    """Merge the adapter into the base weights (merge=True) or copy the run's adapter (merge=False).

    A QLoRA adapter is merged into the de-quantized 4-bit base it was trained on, so the exported
    model computes what the trained one did; full-model runs are written as they are. The folder is
    written next to `out` and swapped in when complete (outdir.staged): a failed export leaves an
    earlier `out` as it was, and `out` may never be, hold or lie inside the run or its base model.
    """
    if not is_run_dir(run_dir):
        raise TunesmithError(f"'{run_dir}' is not a trained run folder (no adapter or model); train first")
    config = load_run_config(run_dir)
    target = Path(out).expanduser()
    reads = inputs("run folder", run_dir) + model_input(config.model, "base model")
    check_target(target, reads, may_replace=overwrite, flag="--out", example="exports/my-model",
                 taken="exists and is not empty; pass --overwrite or choose another folder")
    if not merge:
        with staged(target) as tmp:
            shutil.copytree(run_dir, tmp, ignore=shutil.ignore_patterns("checkpoint-*"), dirs_exist_ok=True)
        return target
    model, tokenizer = _merged_model(run_dir, config)  # loaded before the folder is touched
    with staged(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        shutil.copy(Path(run_dir) / CONFIG_FILE, tmp / "tunesmith_run.yaml")
    return target


def _merged_model(run_dir: str, config):
    """The run's model with its adapter merged in, ready to save as a plain folder, and its tokenizer."""
    loaded = load_for_inference(run_dir)
    if not is_adapter_run(run_dir):
        model = loaded.model
    elif config.method.name == "qlora":
        model = _merge_into_dequantized_base(loaded.model, run_dir)
    else:
        model = loaded.model.merge_and_unload()
    model = model.to(torch.float32)
    model.config.use_cache = True
    stops = stop_token_ids(loaded.tokenizer)
    model.generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]
    model.generation_config.pad_token_id = loaded.tokenizer.pad_token_id
    return model, loaded.tokenizer


def _merge_into_dequantized_base(peft_model, run_dir: str):
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    from .methods.qlora import dequantized_state_dict

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
