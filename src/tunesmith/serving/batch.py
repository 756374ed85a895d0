"""One batched `generate` over rows that may each want a different adapter, sampling, length and stop sequences.

Rows are left-padded, so every prompt ends where generation starts (as `eval` batches them). The per-row
rules ride on transformers' own greedy loop through two hooks, so a greedy row gets exactly the tokens
`tunesmith chat` and `eval` would pick:
- RowSampler (a logits processor) draws a sampled row's token from its own seeded generator, with its own
  temperature and top_p, and leaves only that token possible; greedy rows are untouched.
- RowWatcher (a stopping criterion) sees each new token, feeds the row's text (decoding.py), and ends a row
  on an end-of-turn token, its max_tokens, or a stop sequence.
Which adapters serve each row is the AdapterSet's job (adapters.py).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from .decoding import AnswerText

STOP, LENGTH = "stop", "length"


@dataclass
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class Row:
    """One answer to generate (a request with n > 1 has n rows)."""

    prompt_ids: list[int]
    stack: tuple[str, ...] | None  # the adapters that serve it: () the base, None the model as loaded
    max_tokens: int
    sampling: Sampling
    text: AnswerText
    on_delta: Callable[["Row", str], None] = lambda row, text: None
    on_done: Callable[["Row"], None] = lambda row: None
    cancelled: threading.Event = field(default_factory=threading.Event)
    generated: int = 0
    finish_reason: str | None = None
    error: str | None = None  # set when its generate call failed

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


def left_padded(rows: list[Row], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r.prompt_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.prompt_ids)
        ids[i, width - n:] = torch.tensor(r.prompt_ids, dtype=torch.long)
        mask[i, width - n:] = 1
    return ids, mask


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches top_p (the top token always)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    before = torch.softmax(sorted_logits, dim=-1).cumsum(-1) - torch.softmax(sorted_logits, dim=-1)
    drop = before >= top_p  # tokens whose predecessors already cover top_p
    out = logits.clone()
    out[order[drop]] = float("-inf")
    return out


class RowSampler(LogitsProcessor):
    """Turns each sampled row's scores into a single possible token, drawn with that row's own generator."""

    def __init__(self, rows: list[Row]):
        self.rows = rows
        self.generators = {}
        for i, r in enumerate(rows):
            if r.sampling.temperature > 0:
                g = torch.Generator()
                g.manual_seed(r.sampling.seed) if r.sampling.seed is not None else g.seed()
                self.generators[i] = g

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for i, g in self.generators.items():
            row = self.rows[i]
            if row.done:
                continue
            logits = top_p_filter(scores[i].float() / row.sampling.temperature, row.sampling.top_p)
            token = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=g)
            scores[i] = float("-inf")
            scores[i, token] = 0.0
        return scores


class RowWatcher(StoppingCriteria):
    """Called after every generated token: updates each row's text and says which rows are finished."""

    def __init__(self, rows: list[Row], stop_ids: list[int]):
        self.rows = rows
        self.stop_ids = set(stop_ids)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        last = input_ids[:, -1].tolist()
        for row, token in zip(self.rows, last):
            if not row.done:
                self._step(row, token)
        return torch.tensor([r.done for r in self.rows], dtype=torch.bool, device=input_ids.device)

    def _step(self, row: Row, token: int) -> None:
        if row.cancelled.is_set():  # the client went away: stop spending compute on its answer
            return self._finish(row, STOP)
        row.generated += 1
        if token in self.stop_ids:
            return self._finish(row, STOP)
        delta = row.text.add(token)
        if delta:
            row.on_delta(row, delta)
        if row.text.stopped:
            self._finish(row, STOP)
        elif row.generated >= row.max_tokens:
            self._finish(row, LENGTH)

    @staticmethod
    def _finish(row: Row, reason: str) -> None:
        delta = row.text.finish()
        if delta:
            row.on_delta(row, delta)
        row.finish_reason = reason
        row.on_done(row)


@torch.inference_mode()
def generate_rows(model, rows: list[Row], pad_id: int, stop_ids: list[int], **adapter_kwargs) -> None:
    """Generate every row to its end; rows report their text and finish through their callbacks."""
    ids, mask = left_padded(rows, pad_id)
    device = next(model.parameters()).device
    sampled = any(r.sampling.temperature > 0 for r in rows)
    model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=max(r.max_tokens for r in rows),
        do_sample=False,
        eos_token_id=stop_ids,
        pad_token_id=pad_id,
        logits_processor=LogitsProcessorList([RowSampler(rows)] if sampled else []),
        stopping_criteria=StoppingCriteriaList([RowWatcher(rows, stop_ids)]),
        **adapter_kwargs,
    )
    for row in rows:  # generate ended every row (max_new_tokens is the longest max_tokens); this is a safeguard
        if not row.done:
            RowWatcher._finish(row, LENGTH)
