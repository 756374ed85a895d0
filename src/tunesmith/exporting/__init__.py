"""`tunesmith.export(run)`: a plain Hugging Face folder that loads without tunesmith or PEFT.

The other formats live beside it: `gguf` (one .gguf + an Ollama Modelfile, for llama.cpp, Ollama, LM Studio)
and `vllm` (the adapters in the layout vLLM loads, a serve.sh and the chat template).
"""
from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import TunesmithError
from ..outdir import check_target, inputs, model_input, staged
from ..rundir import CONFIG_FILE, is_run_dir, load_run_config
from .merged import merged_model as _merged_model


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

