"""AdaLoRA's orthogonality regulariser (Zhang et al. 2023, eq. 4) as a MethodTrainer loss term.

R = orth_reg_weight * mean over the adapter's A and B of ||P P^T - I||_F (A: rows orthonormal, P = A;
B: columns orthonormal, P = B^T), PEFT's AdaLoraModel.forward formula. PEFT adds it to the loss of every
forward that has labels; tunesmith's selective loss and preference scoring call the decoder body directly, so
the term comes from here instead, counted once per optimizer step (loss_terms.micro_batch_share): with gradient
accumulation PEFT's version counts it once per micro batch.
"""
from __future__ import annotations

import torch

from ..loss_terms import micro_batch_share


class AdaLoraOrthogonality:
    """orth_reg_weight * mean ||P P^T - I||_F over the trainable adapter's lora_A and lora_B."""

    def __init__(self, peft_model, weight: float, adapter: str = "default"):
        self.weight = float(weight)
        self.factors = [(p, "lora_A" in n) for n, p in peft_model.named_parameters()
                        if ("lora_A" in n or "lora_B" in n) and adapter in n]

    def penalty(self) -> torch.Tensor:
        total = None
        for p, is_a in self.factors:
            cov = p @ p.T if is_a else p.T @ p
            eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
            part = torch.linalg.matrix_norm(cov - eye)  # Frobenius
            total = part if total is None else total + part
        return self.weight * total / len(self.factors)

    def __call__(self, model, inputs: dict, hidden) -> torch.Tensor:
        if not self.factors or self.weight == 0:
            return torch.zeros(())
        return self.penalty() * micro_batch_share(inputs)
