"""`tunesmith.export(run)`: a plain Hugging Face folder that loads without tunesmith or PEFT."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from .errors import TunesmithError
from .inference import load_for_inference, stop_token_ids
from .methods import get_method
from .outdir import check_target, inputs, model_input, staged
from .rundir import CONFIG_FILE, is_adapter_run, is_run_dir, load_run_config


def export(run_dir: str, out: str, merge: bool = True, overwrite: bool = False) -> Path:
    """Merge the adapter into the base weights (merge=True) or copy the run's adapter (merge=False).

    The method's registry entry merges its adapter (QLoRA: into the de-quantized 4-bit base it was trained
    on, so the exported model computes what the trained one did); full-model runs are written as they are.
    The folder is written next to `out` and swapped in when complete (outdir.staged): a failed export
    leaves an earlier `out` as it was, and `out` may never be, hold or lie inside the run or its base model.
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
    else:
        model = get_method(config.method.name).merge(loaded.model, run_dir)
    model = model.to(torch.float32)
    model.config.use_cache = True
    stops = stop_token_ids(loaded.tokenizer)
    model.generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]
    model.generation_config.pad_token_id = loaded.tokenizer.pad_token_id
    return model, loaded.tokenizer
