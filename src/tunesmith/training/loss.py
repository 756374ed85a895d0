"""The SFT loss without the (tokens x vocabulary) logits matrix.

Only positions whose next token is supervised reach the lm_head (prompt tokens never do), and those
rows go through it in chunks. Each chunk's gradient is computed in the forward pass, while its
logits are at hand, so backward is two multiplications by the incoming scalar instead of a second
pass through the lm_head. Equal to cross-entropy over the full logits (tests/test_loss.py).
"""
from __future__ import annotations

import torch

from ..data.masking import IGNORE_INDEX

DEFAULT_CHUNK_ROWS = 1024


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, scale, chunk_rows):
        needs_h, needs_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if needs_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        w = weight.to(hidden.dtype)
        for start in range(0, hidden.shape[0], chunk_rows):
            h = hidden[start : start + chunk_rows]
            t = targets[start : start + chunk_rows]
            logits = (h @ w.T).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if needs_h or needs_w:
                probs = torch.exp(logits - lse[:, None])
                probs[torch.arange(t.shape[0], device=t.device), t] -= 1.0
                probs *= scale
                if needs_h:
                    grad_h[start : start + chunk_rows] = (probs.to(w.dtype) @ w).to(hidden.dtype)
                if needs_w:
                    grad_w += probs.T @ h.float()
        ctx.save_for_backward(*(g for g in (grad_h, grad_w) if g is not None))
        ctx.has = (needs_h, needs_w)
        ctx.weight_dtype = weight.dtype
        return total * scale

    @staticmethod
    def backward(ctx, grad_out):
        saved = list(ctx.saved_tensors)
        needs_h, needs_w = ctx.has
        grad_h = saved.pop(0) * grad_out if needs_h else None
        grad_w = (saved.pop(0) * grad_out).to(ctx.weight_dtype) if needs_w else None
        return grad_h, grad_w, None, None, None


def selective_cross_entropy(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    normalizer: float | torch.Tensor | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> tuple[torch.Tensor, int]:
    """Next-token cross-entropy summed over supervised positions, divided by `normalizer`.

    hidden: (batch, seq, hidden) final hidden states; labels: (batch, seq) aligned with the inputs
    (-100 where no loss), shifted here. Returns (loss, number of supervised tokens).
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    rows = hidden[:, :-1][keep]
    chosen = targets[keep]
    count = int(chosen.numel())
    if count == 0:
        return hidden.sum() * 0.0, 0
    norm = float(normalizer) if normalizer is not None else float(count)
    loss = _ChunkedLinearCrossEntropy.apply(rows, lm_head_weight, chosen, 1.0 / norm, chunk_rows)
    return loss, count
