"""The transformers Trainer with our optimizer groups and our loss."""
from __future__ import annotations

import torch
from transformers import Trainer

from ..data.collate import packed_kwargs
from ..data.masking import IGNORE_INDEX
from ..modeling import causal_lm, decoder_body
from .loss import selective_cross_entropy


class SupervisedTokenCount:
    """The one private Trainer hook tunesmith overrides, kept here alone: `Trainer._get_num_items_in_batch`.

    Written against transformers 5.24, where `Trainer.get_batch_samples` calls
    `_get_num_items_in_batch(self, batch_samples, device)` once per optimizer step with all its micro batches,
    and the loss sum is divided by what it returns. With selective loss that must be the supervised
    next-token targets of the whole accumulated batch. tests/test_trainer_hooks.py fails if a transformers
    release renames the hook, changes its parameters, or stops calling it in the training loop.
    """

    def _get_num_items_in_batch(self, batch_samples, device):
        """Supervised next-token targets in the accumulated batch (labels shifted, as the loss sees them)."""
        if not self.selective_loss:
            return super()._get_num_items_in_batch(batch_samples, device)
        count = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batch_samples if "labels" in b)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            count = int(self.accelerator.gather(torch.tensor(count, device=device)).sum())
        return count


class MethodTrainer(SupervisedTokenCount, Trainer):
    """Trainer whose optimizer comes from the method's parameter groups and whose loss skips prompt logits.

    - Each group's lr is the base lr times its `lr_scale` (LoRA+ gives B matrices a larger one).
      Methods that pick their optimizer through TrainingArguments (GaLore) pass no groups.
    - With `selective_loss`, the decoder body runs once and only supervised positions reach the
      lm_head, in chunks (training/loss.py). The sum is divided by the supervised tokens of the whole
      accumulated batch (SupervisedTokenCount), so gradient accumulation gives the same gradient as one big batch.
    - `loss_terms` are extra differentiable terms (regularisers) added to the loss in training.
    """

    def __init__(self, *args, param_groups: list[dict] | None = None, selective_loss: bool = False,
                 loss_terms: list | None = None, **kwargs):
        self.param_groups = param_groups or []
        self.selective_loss = selective_loss
        self.loss_terms = loss_terms or []
        super().__init__(*args, **kwargs)
        if selective_loss:
            self.loss_is_scaled_for_ga = True

    def create_optimizer(self, model=None):
        if not self.param_groups or self.optimizer is not None:
            return super().create_optimizer(model)
        args = self.args
        groups = []
        for g in self.param_groups:
            decay = [p for p in g["params"] if p.ndim >= 2]
            no_decay = [p for p in g["params"] if p.ndim < 2]
            lr = args.learning_rate * g.get("lr_scale", 1.0)
            if decay:
                groups.append({"params": decay, "lr": lr, "weight_decay": args.weight_decay})
            if no_decay:
                groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0})
        self.optimizer = torch.optim.AdamW(
            groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon, foreach=True
        )
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "position_ids" in inputs:
            # Padding-free rows: the mask is only there for token counting; attention follows position_ids.
            inputs = {k: v for k, v in inputs.items() if k != "attention_mask"}
        if not self.selective_loss:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs["labels"]
        body = decoder_body(model)
        hidden = body(
            input_ids=inputs["input_ids"],
            attention_mask=inputs.get("attention_mask"),
            position_ids=inputs.get("position_ids"),
            use_cache=False,
            **packed_kwargs(inputs),
        ).last_hidden_state
        head = causal_lm(model).get_output_embeddings()
        normalizer = num_items_in_batch if model.training and num_items_in_batch else None
        loss, _ = selective_cross_entropy(hidden, head.weight, labels, normalizer)
        if model.training and self.loss_terms:
            # Terms see the same normaliser as the SFT sum (supervised tokens of the accumulated batch).
            term_inputs = {**inputs, "num_items_in_batch": normalizer}
            for term in self.loss_terms:
                loss = loss + term(model, term_inputs, hidden)
        return (loss, {"loss": loss}) if return_outputs else loss
