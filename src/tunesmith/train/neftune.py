"""NEFTune (Jain et al. 2023): uniform noise on the input embeddings during training only.

noise ~ U(-1, 1) * alpha / sqrt(L * d), with L the sequence length of the batch row and d the hidden
size. The paper (and transformers) use the padded length of the batch; we use each row's real
length from the attention mask, so padding and packing do not change the noise an example gets.
"""
from __future__ import annotations

import math

import torch


class NEFTune:
    def __init__(self, model: torch.nn.Module, alpha: float):
        self.alpha = alpha
        self.embedding = model.get_input_embeddings()
        self.lengths: torch.Tensor | None = None
        self._handles = [
            model.register_forward_pre_hook(self._remember_lengths, with_kwargs=True),
            self.embedding.register_forward_hook(self._add_noise),
        ]

    def _remember_lengths(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        self.lengths = mask.sum(dim=1) if mask is not None and mask.dim() == 2 else None

    def scale(self, seq_len: int, hidden: int, lengths: torch.Tensor | None, batch: int) -> torch.Tensor:
        L = lengths.clamp(min=1).to(torch.float32) if lengths is not None else torch.full((batch,), float(seq_len))
        return (self.alpha / torch.sqrt(L * hidden)).view(-1, 1, 1)

    def _add_noise(self, module, inputs, output):
        if not module.training:
            return output
        batch, seq_len, hidden = output.shape
        lengths = self.lengths if self.lengths is not None and self.lengths.numel() == batch else None
        bound = self.scale(seq_len, hidden, lengths, batch).to(output.device, output.dtype)
        return output + torch.empty_like(output).uniform_(-1, 1) * bound

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def expected_noise_std(alpha: float, length: int, hidden: int) -> float:
    """Standard deviation of U(-b, b) noise with b = alpha / sqrt(L d): b / sqrt(3)."""
    return alpha / math.sqrt(length * hidden) / math.sqrt(3)
