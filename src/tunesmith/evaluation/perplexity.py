"""Eval loss and perplexity over supervised tokens only, in fp32."""
from __future__ import annotations

import math

import torch

from ..data.collate import PaddingCollator
from ..data.masking import IGNORE_INDEX, TokenizedExample


@torch.inference_mode()
def supervised_nll(model, examples: list[TokenizedExample], pad_token_id: int, batch_size: int = 8) -> dict:
    """Mean next-token NLL over every supervised token (token-weighted, not example-weighted)."""
    collate = PaddingCollator(pad_token_id)
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for i in range(0, len(examples), batch_size):
        batch = collate([{"input_ids": e.input_ids, "labels": e.labels} for e in examples[i : i + batch_size]])
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        shift_logits = logits[:, :-1].float()
        shift_labels = batch["labels"][:, 1:].to(device)
        nll = torch.nn.functional.cross_entropy(
            shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
            ignore_index=IGNORE_INDEX, reduction="sum",
        )
        total += nll.item()
        count += int((shift_labels != IGNORE_INDEX).sum())
    loss = total / count if count else float("nan")
    return {"eval_loss": loss, "perplexity": math.exp(loss) if count else float("nan"), "eval_tokens": count}
