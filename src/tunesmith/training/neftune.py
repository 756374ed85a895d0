"""NEFTune (Jain et al. 2023): uniform noise on the input embeddings during training only.

noise ~ U(-1, 1) * alpha / sqrt(L * d), with L the sequence length of the batch row and d the hidden
size. The paper (and transformers) use the padded length of the batch; we use each row's real
length from the attention mask, so padding and packing do not change the noise an example gets.
"""
from __future__ import annotations

import torch

from ..modeling import decoder_body


class NEFTune:
    def __init__(self, model: torch.nn.Module, alpha: float):
        self.alpha = alpha
        self.embedding = model.get_input_embeddings()
        self.lengths: torch.Tensor | None = None
        body = decoder_body(model) or model
        self._handles = [
            body.register_forward_pre_hook(self._remember_lengths, with_kwargs=True),
            self.embedding.register_forward_hook(self._add_noise),
        ]

    def _remember_lengths(self, module, args, kwargs):
        """Per-token length L of the example each token belongs to, from the mask or the packed positions."""
        mask, positions = kwargs.get("attention_mask"), kwargs.get("position_ids")
        if mask is not None and mask.dim() == 2:
            self.lengths = mask.sum(dim=1, keepdim=True).expand_as(mask)
        elif positions is not None and positions.dim() == 2:
            self.lengths = example_lengths(positions)
        else:
            self.lengths = None

    def scale(self, seq_len: int, hidden: int, lengths: torch.Tensor | None, batch: int) -> torch.Tensor:
        if lengths is None:
            lengths = torch.full((batch, seq_len), float(seq_len))
        return (self.alpha / torch.sqrt(lengths.clamp(min=1).to(torch.float32) * hidden)).unsqueeze(-1)

    def _add_noise(self, module, inputs, output):
        if not module.training:
            return output
        batch, seq_len, hidden = output.shape
        lengths = self.lengths if self.lengths is not None and tuple(self.lengths.shape) == (batch, seq_len) else None
        bound = self.scale(seq_len, hidden, lengths, batch).to(output.device, output.dtype)
        return output + torch.empty_like(output).uniform_(-1, 1) * bound

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def example_lengths(position_ids: torch.Tensor) -> torch.Tensor:
    """For packed rows (positions restart at 0 per example): each token's example length."""
    out = torch.empty_like(position_ids)
    for row in range(position_ids.shape[0]):
        starts = (position_ids[row] == 0).nonzero().flatten().tolist() + [position_ids.shape[1]]
        for a, b in zip(starts, starts[1:]):
            out[row, a:b] = b - a
    return out
