"""Greedy decoding for eval, chat and serving: the tokens transformers' `generate` picks, with less work per token.

`model.generate` keeps decoding every row of a batch until the longest answer ends (a finished row goes on
producing padding through the whole model), and wraps each forward in per-step bookkeeping (logits
processors, stopping criteria, keyword-argument updates). This loop gives the model's forward the inputs
`generate` gives it (left-padded prompts, position ids counted from the attention mask, a `DynamicCache`,
logits of the last position only) and takes the argmax, as greedy `generate` does; rows that emit a stop
token leave the batch and the cache, so later steps run on the rows still writing.

Eval prompts share a long start (the chat template's system turn, the task's instruction): `SharedPrefix`
runs it through the model once, and each batch starts from its keys and values instead of recomputing them.

Two costs of each step go without changing a number: `DynamicCache` concatenates every layer's keys and values
with the new token's (a copy of the whole cache per step), where `GrowingLayer` writes the token into a buffer
sized once for the batch and hands attention the filled part (the same shapes and values); and PEFT's LoRA
layers run `lean_lora.LeanLora`'s forward (PEFT's ops without its per-call bookkeeping) while decoding.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .lean_lora import LeanLora

# A batch never shrinks below this many rows (or its own size): with fewer rows, this CPU's float32 matrix
# multiply takes another kernel whose sums round differently (rows 1..15 of a 25-row product differ in the last
# bits when computed alone), which could change a greedy token against `generate`'s full batch.
MIN_ROWS = 16


@dataclass
class SharedPrefix:
    """The keys and values of the tokens every prompt starts with, computed once for one row."""

    ids: list[int]
    layers: list[tuple[torch.Tensor, torch.Tensor]]

    def fill(self, cache: DynamicCache, rows: int) -> None:
        """Put the prefix into an empty cache, for `rows` rows, ready for the rest of each prompt."""
        for index, (keys, values) in enumerate(self.layers):
            cache.update(keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1), index)


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values live in a buffer of `capacity` positions allocated at the first
    update: each update writes the new positions in place and exposes the filled part as a view, where
    `DynamicLayer` concatenates (copying the whole cache every step). Attention sees the same shapes and values.

    Only what greedy decoding calls is kept consistent with the buffer: `update` and `batch_select_indices`."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity, self.length = capacity, 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        rows, heads, _, width = key_states.shape
        self.key_buffer = key_states.new_empty(rows, heads, self.capacity, width)
        self.value_buffer = value_states.new_empty(rows, heads, self.capacity, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache of {self.capacity} positions asked to hold {end}")
        self.key_buffer[:, :, self.length : end] = key_states
        self.value_buffer[:, :, self.length : end] = value_states
        self.length = end
        self._expose()
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.key_buffer, self.value_buffer = self.key_buffer[indices], self.value_buffer[indices]
            self._expose()

    def _expose(self) -> None:
        self.keys = self.key_buffer[:, :, : self.length]
        self.values = self.value_buffer[:, :, : self.length]


def growing_cache(config, capacity: int) -> DynamicCache:
    """A `DynamicCache` of `GrowingLayer`s holding up to `capacity` positions; a plain one for models whose
    layers are not all plain `DynamicLayer`s (sliding windows, linear attention), which keep their own logic."""
    cache = DynamicCache(config=config)
    if cache.layers and all(type(layer) is DynamicLayer for layer in cache.layers):
        cache.layers = [GrowingLayer(capacity) for _ in cache.layers]
    return cache


@torch.inference_mode()
def shared_prefix(model, ids: list[int]) -> SharedPrefix | None:
    """Run the prefix `ids` once; None when there is none to share."""
    if not ids:
        return None
    forward = CachedForward(model, DynamicCache(config=model.config))
    prompt = torch.tensor([ids], device=next(model.parameters()).device)
    forward(prompt, torch.ones_like(prompt), torch.arange(len(ids), device=prompt.device)[None])
    layers = [(layer.keys, layer.values) for layer in forward.cache.layers]
    return SharedPrefix(list(ids), layers)


@torch.inference_mode()
def greedy_decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                  stop_ids: list[int], prefix: SharedPrefix | None = None) -> list[list[int]]:
    """The new token ids of each left-padded row, up to and including its first stop token.

    Row i of the result is what `model.generate(..., do_sample=False)` writes after the prompt (`prefix`'s
    tokens followed by row i), without the padding it appends once the row has finished.
    """
    if max_new_tokens <= 0 or input_ids.shape[0] == 0:
        return [[] for _ in range(input_ids.shape[0])]
    with LeanLora(model):
        return _decode(model, input_ids, attention_mask, max_new_tokens, stop_ids, prefix)


def _decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, stop_ids: list[int],
            prefix: SharedPrefix | None) -> list[list[int]]:
    rows = input_ids.shape[0]
    answers: list[list[int]] = [[] for _ in range(rows)]
    stops = torch.tensor(stop_ids, dtype=torch.long, device=input_ids.device)
    mask = attention_mask.long()
    shared = 0 if prefix is None else len(prefix.ids)
    # the last step's token is not fed back, so the cache holds prompt + max_new_tokens - 1 positions
    cache = growing_cache(model.config, shared + input_ids.shape[1] + max_new_tokens - 1)
    if prefix is not None:
        prefix.fill(cache, rows)
        mask = torch.cat([mask.new_ones(rows, shared), mask], dim=-1)
    # generate's position ids: count real tokens from 0, padding at 0 (masked out anyway).
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    forward = CachedForward(model, cache)
    logits = forward(input_ids, mask, positions[:, -input_ids.shape[1]:])
    active = torch.arange(rows, device=input_ids.device)  # which original row each batch row is
    ended = torch.zeros(rows, dtype=torch.bool, device=input_ids.device)
    floor = min(rows, MIN_ROWS)
    last = positions[:, -1:]
    for step in range(max_new_tokens):
        tokens = logits[:, -1].float().argmax(-1)
        for row, token, done in zip(active.tolist(), tokens.tolist(), ended.tolist()):
            if not done:
                answers[row].append(token)
        ended = ended | torch.isin(tokens, stops)
        if step == max_new_tokens - 1 or bool(ended.all()):
            break
        keep = rows_to_keep(ended, floor)
        if len(keep) < len(active):
            active, tokens, ended, mask, last = active[keep], tokens[keep], ended[keep], mask[keep], last[keep]
            cache.batch_select_indices(keep)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
        last = last + 1
        logits = forward(tokens[:, None], mask, last)
    return answers


def rows_to_keep(ended: torch.Tensor, floor: int) -> torch.Tensor:
    """The rows still writing, topped up with ended ones (in order) to at least `floor` rows."""
    running = (~ended).nonzero().squeeze(-1)
    if len(running) >= floor:
        return running
    filler = ended.nonzero().squeeze(-1)[: floor - len(running)]
    return torch.cat([running, filler]).sort().values


class CachedForward:
    """One call of the model's forward as `generate` makes it: with the cache, logits of the last position only.

    The cache keyword is `cache` in recent transformers and `past_key_values` before; a model without
    `logits_to_keep` computes every position's logits, of which only the last is read.
    """

    def __init__(self, model, cache: DynamicCache):
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT passes keywords on
        accepted = inspect.signature(inner.forward).parameters
        self.model, self.cache = model, cache
        self.extra = {"cache" if "cache" in accepted else "past_key_values": cache, "use_cache": True}
        if "logits_to_keep" in accepted:
            self.extra["logits_to_keep"] = 1

    def __call__(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **self.extra)
        return out.logits
