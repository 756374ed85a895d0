"""Batches for training: right padding, and pad positions never carry loss (by position, not by id)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .masking import IGNORE_INDEX


@dataclass
class PaddingCollator:
    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            longest = (longest + m - 1) // m * m
        ids = torch.full((len(features), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), longest), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(features), longest), dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            ids[row, :n] = torch.as_tensor(f["input_ids"])
            labels[row, :n] = torch.as_tensor(f["labels"])
            mask[row, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


PACKED_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def packed_kwargs(inputs: dict) -> dict:
    """The example boundaries a padding-free batch carries, to pass on to the model's forward."""
    return {k: inputs[k] for k in PACKED_KEYS if k in inputs}


@dataclass
class PaddingFreeCollator:
    """All examples of a micro batch in one row, no padding: position ids restart at every example,
    which keeps attention inside each example (transformers builds the block-diagonal mask from them).

    The first label of every example is -100 so no example learns to predict its neighbour's start.
    The all-ones attention_mask is only for counting tokens; the trainer drops it before the forward.
    `cu_seq_lens_*` / `max_length_*` mark where each example starts, under the names flash-attention's varlen
    path reads (train/attention.py reads them on CPU): attention then never computes across examples.
    """

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        ids, labels, positions, edges = [], [], [], [0]
        for f in features:
            n = len(f["input_ids"])
            ids.extend(f["input_ids"])
            labels.extend([IGNORE_INDEX] + list(f["labels"][1:]))
            positions.extend(range(n))
            edges.append(edges[-1] + n)
        row = lambda xs: torch.tensor([xs], dtype=torch.long)  # noqa: E731
        bounds = torch.tensor(edges, dtype=torch.int32)
        longest = max(len(f["input_ids"]) for f in features)
        return {
            "input_ids": row(ids),
            "labels": row(labels),
            "position_ids": row(positions),
            "attention_mask": torch.ones((1, len(ids)), dtype=torch.long),
            "cu_seq_lens_q": bounds,
            "cu_seq_lens_k": bounds,
            "max_length_q": longest,
            "max_length_k": longest,
        }
