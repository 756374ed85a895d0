"""A run as one plain model: the adapter merged into its base, shared by every export format."""
from __future__ import annotations

import torch

from ..config import RunConfig
from ..inference import load_for_inference, stop_token_ids
from ..methods import get_method
from ..rundir import is_adapter_run


def merged_model(run_dir: str, config: RunConfig):
    """The run's model with its adapter merged in (fp32), ready to save as a plain model, and its tokenizer.

    The method's registry entry merges its adapter (QLoRA: into the de-quantized 4-bit base it was trained
    on, so the exported model computes what the trained one did); full-model runs come as they are.
    """
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
