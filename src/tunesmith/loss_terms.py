"""Loss terms beside the SFT loss (regularizers, AdaLoRA's orthogonality): how a term that counts once per
optimizer step is shared among the micro batches of a step."""
from __future__ import annotations

from .data.masking import IGNORE_INDEX


def micro_batch_share(inputs: dict) -> float:
    """This micro batch's share of the accumulated batch's supervised tokens: a once-per-step penalty times
    this, summed over the micro batches of a step, counts once (any grad_accum)."""
    n = inputs.get("num_items_in_batch")
    if not n:
        return 1.0
    count = int((inputs["labels"][:, 1:] != IGNORE_INDEX).sum())
    return count / float(n)
