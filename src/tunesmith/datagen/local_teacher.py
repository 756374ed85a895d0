"""A teacher loaded in-process: any model tunesmith can load (default: the built-in model), sampling in
left-padded batches.

Each request samples from its own random generator, seeded by the request's seed, so a request's text does not
depend on which other requests share its batch: a run continued after a kill (whose batches are cut
differently) writes the rows an uninterrupted run would have. `generate` cannot give each row its own
generator, so `RowSampler` draws every row's token itself and hands `generate` scores in which only that token
is possible, which greedy decoding then picks.
"""
from __future__ import annotations

from itertools import groupby
from typing import Sequence

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from ..data.templates import render
from ..inference import stop_token_ids
from ..models import load_model, load_tokenizer
from .teacher import Reply, Request, Usage


def top_p_probabilities(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Softmax at the temperature over the smallest set of most likely tokens whose probability reaches top_p
    (the most likely token always stays), the rest 0."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(descending=True)
    before = sorted_probs.cumsum(-1) - sorted_probs  # probability of the tokens ranked above each one
    sorted_probs[before >= top_p] = 0.0
    return torch.zeros_like(probs).scatter(-1, order, sorted_probs)


class RowSampler(LogitsProcessor):
    """Draws each row's next token with that row's generator; temperature 0 takes the argmax."""

    def __init__(self, requests: list[Request]):
        self.requests = requests
        self.generators = [torch.Generator().manual_seed(r.seed) for r in requests]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        chosen = torch.full_like(scores, float("-inf"))
        for row, (request, generator) in enumerate(zip(self.requests, self.generators)):
            if request.temperature > 0:
                probs = top_p_probabilities(scores[row], request.temperature, request.top_p)
                token = torch.multinomial(probs, 1, generator=generator)
            else:
                token = scores[row].argmax(-1, keepdim=True)
            chosen[row, token] = 0.0
        return chosen


class LocalTeacher:
    def __init__(self, ref: str, batch_size: int = 8):
        self.name = ref
        self.tokenizer = load_tokenizer(ref)
        self.model = load_model(ref)
        self.model.eval()
        self.batch_size = batch_size
        self.usage = Usage()
        self._stops = stop_token_ids(self.tokenizer)

    def generate(self, requests: Sequence[Request]) -> list[Reply]:
        """Batches of requests with the same stop strings (`generate` stops a row on any string it is given)."""
        replies: dict[int, Reply] = {}
        by_stop = sorted(range(len(requests)), key=lambda i: requests[i].stop)
        for _, group in groupby(by_stop, key=lambda i: requests[i].stop):
            group = list(group)
            for start in range(0, len(group), self.batch_size):
                chunk = group[start:start + self.batch_size]
                replies.update(zip(chunk, self._batch([requests[i] for i in chunk])))
        return [replies[i] for i in range(len(requests))]

    @torch.inference_mode()
    def _batch(self, requests: list[Request]) -> list[Reply]:
        prompts = [render(self.tokenizer, r.messages, add_generation_prompt=True) for r in requests]
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"
        try:
            enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        finally:
            self.tokenizer.padding_side = side
        stops = {"stop_strings": list(requests[0].stop), "tokenizer": self.tokenizer} if requests[0].stop else {}
        out = self.model.generate(
            input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
            max_new_tokens=max(r.max_tokens for r in requests), eos_token_id=self._stops,
            pad_token_id=self.tokenizer.pad_token_id, do_sample=False, temperature=None, top_p=None, top_k=None,
            logits_processor=LogitsProcessorList([RowSampler(requests)]), **stops)
        new = out[:, enc["input_ids"].shape[1]:]
        self.usage.add(requests=len(requests), prompt_tokens=int(enc["attention_mask"].sum()))
        return [self._reply(row, r) for row, r in zip(new, requests)]

    def _reply(self, ids: torch.Tensor, request: Request) -> Reply:
        ids = ids.tolist()
        ended = next((i for i, t in enumerate(ids) if t in self._stops), None)
        kept = ids[:ended] if ended is not None else ids
        cut = ended is None and len(kept) >= request.max_tokens
        kept = kept[: request.max_tokens]
        self.usage.add(completion_tokens=len(kept))
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        for stop in request.stop:
            if stop in text:
                text, cut = text[: text.index(stop)], False
        return Reply(text.strip(), "length" if cut else "stop")
