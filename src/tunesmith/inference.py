"""Load what a user points at (run folder, recipe, model) for generation, and generate from it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .config import RunConfig, load_config
from .data.masking import END_MARKERS
from .data.templates import apply_template_override
from .errors import TunesmithError
from .models import broken_safetensors, load_model, load_tokenizer
from .methods import get_method
from .methods.adapter_stack import load_previous_adapters
from .rundir import is_adapter_run, is_run_dir, load_run_config


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    config: RunConfig | None
    label: str


def resolve_target(target: str, base: bool = False) -> tuple[RunConfig | None, Path | None]:
    """(config, run folder) for a run folder or recipe; (None, None) for a plain model reference."""
    path = Path(target)
    if path.is_dir() and is_run_dir(path):
        return load_run_config(path), (None if base else path)
    if path.suffix in (".yaml", ".yml"):
        config = load_config(path)
        run = Path(config.output_dir)
        if base:
            return config, None
        if not is_run_dir(run):
            raise TunesmithError(
                f"recipe '{target}' has not been trained yet (no adapter in '{run}'): run `tunesmith train {target}` "
                "first, or pass --base to use the untouched base model"
            )
        return load_run_config(run), run
    if path.is_dir() and (path / "config.yaml").exists() and not (path / "config.json").exists():
        raise TunesmithError(f"run folder '{target}' has no adapter yet: training did not finish; use --resume")
    return None, None


def load_for_inference(target: str, base: bool = False) -> LoadedModel:
    config, run = resolve_target(target, base)
    if config is None:
        tokenizer = load_tokenizer(target)
        model = load_model(target)
        label = target
    else:
        tokenizer = load_tokenizer(str(run) if run else config.model, config.trust_remote_code)
        if run is None:
            apply_template_override(tokenizer, config.data.chat_template)
        model, label = _load_run_model(config, run)
    model.eval()
    return LoadedModel(model, tokenizer, config, label)


def _load_run_model(config: RunConfig, run: Path | None):
    """The base alone, a full-model run, or the base (4-bit for QLoRA, as trained) plus the run's adapter."""
    if run is not None and not is_adapter_run(run):
        return load_model(str(run), trust_remote_code=config.trust_remote_code), str(run)
    method = get_method(config.method.name)
    kwargs = method.load_kwargs(config) if run is not None else {}
    model = load_model(config.model, trust_remote_code=config.trust_remote_code, **kwargs)
    if run is None:
        return model, f"{config.model} (base)"
    from peft import PeftModel  # heavy: only a run with an adapter needs peft

    broken = broken_safetensors(run)
    if broken is not None:
        raise TunesmithError(f"run folder '{run}': '{broken.name}' is truncated or corrupt; train the run again "
                             "(or --resume it from a checkpoint)")
    model = PeftModel.from_pretrained(model, str(run))
    if config.continual.previous:  # the earlier tasks' adapters, stacked as the run trained
        load_previous_adapters(model, run)
    method.after_load(model)
    return model, str(run)


def stop_token_ids(tokenizer) -> list[int]:
    """The eos id plus every end-of-turn marker the vocabulary has as a single token."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    for marker in END_MARKERS:
        if marker in vocab:
            ids.add(vocab[marker])
    return sorted(ids)


@torch.inference_mode()
def generate_batch(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy answers for rendered prompts, left-padded so every prompt ends where generation starts."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    device = next(model.parameters()).device
    out = model.generate(
        input_ids=enc["input_ids"].to(device),
        attention_mask=enc["attention_mask"].to(device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=stop_token_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
    )
    new = out[:, enc["input_ids"].shape[1]:]
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]
