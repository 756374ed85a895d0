"""Load what a user points at (run folder, recipe, model) for generation, and generate from it."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import RunConfig, load_config
from .data.masking import END_MARKERS
from .data.templates import apply_template_override
from .errors import TunesmithError
from .generation import greedy_decode, shared_prefix
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


def generate_batch(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy answers for rendered prompts, generated as one batch."""
    return generate_answers(model, tokenizer, prompts, max_new_tokens, batch_size=max(len(prompts), 1))


def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int,
                     on_batch: Callable[[int], None] | None = None) -> list[str]:
    """Greedy answers for rendered prompts, in their order: `answer_tokens` decoded, special tokens dropped."""
    rows = answer_tokens(model, tokenizer, prompts, max_new_tokens, batch_size, on_batch)
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in rows]


@torch.inference_mode()
def answer_tokens(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int,
                  on_batch: Callable[[int], None] | None = None) -> list[list[int]]:
    """The tokens greedy `model.generate` writes after each rendered prompt (through its first stop token).

    Prompts run shortest first in batches of `batch_size` (less padding per batch); the tokens every prompt
    starts with (the system turn, the task's instruction) go through the model once for all batches.
    `on_batch(n)` is called after each batch of n prompts (a progress bar).
    """
    if not prompts:
        return []
    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    device = next(model.parameters()).device
    shared = common_prefix(ids) if len(ids) > 1 else []
    prefix = shared_prefix(model, shared)
    stops = stop_token_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    answers: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        input_ids, mask = left_padded([ids[i][len(shared):] for i in batch], pad)
        rows = greedy_decode(model, input_ids.to(device), mask.to(device), max_new_tokens, stops, prefix)
        for i, row in zip(batch, rows):
            answers[i] = row
        if on_batch is not None:
            on_batch(len(batch))
    return answers


def common_prefix(rows: list[list[int]]) -> list[int]:
    """The longest start all rows share, leaving each row at least one token of its own."""
    limit = min(len(r) for r in rows) - 1
    length = 0
    while length < limit and all(r[length] == rows[0][length] for r in rows):
        length += 1
    return rows[0][:length]


def left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) with every row padded on the left to the longest, as generation needs."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    return ids, mask
