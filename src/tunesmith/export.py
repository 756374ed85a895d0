"""`tunesmith.export(run)`: a plain Hugging Face folder that loads without tunesmith or PEFT."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from .errors import TunesmithError
from .inference import load_for_inference, stop_token_ids
from .rundir import CONFIG_FILE, is_run_dir


def export(run_dir: str, out: str, merge: bool = True, overwrite: bool = False) -> Path:
    """Merge the adapter into the base weights (merge=True) or copy the adapter folder (merge=False)."""
    if not is_run_dir(run_dir):
        raise TunesmithError(f"'{run_dir}' is not a trained run folder (no adapter_config.json); train first")
    target = Path(out)
    if target.exists() and any(target.iterdir()):
        if not overwrite:
            raise TunesmithError(f"--out '{out}' exists and is not empty; pass --overwrite or choose another folder")
        shutil.rmtree(target)
    if not merge:
        shutil.copytree(run_dir, target, ignore=shutil.ignore_patterns("checkpoint-*"))
        return target
    loaded = load_for_inference(run_dir)
    merged = loaded.model.merge_and_unload()
    merged = merged.to(torch.float32)
    merged.config.use_cache = True
    stops = stop_token_ids(loaded.tokenizer)
    merged.generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]
    merged.generation_config.pad_token_id = loaded.tokenizer.pad_token_id
    tmp = target.with_name(f".{target.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    merged.save_pretrained(tmp, safe_serialization=True)
    loaded.tokenizer.save_pretrained(tmp)
    shutil.copy(Path(run_dir) / CONFIG_FILE, tmp / "tunesmith_run.yaml")
    tmp.rename(target)
    return target
