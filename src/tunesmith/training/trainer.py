"""The transformers Trainer with our optimizer groups and our loss."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from transformers import Trainer
from transformers.trainer_utils import rotate_checkpoints

from ..data.collate import packed_kwargs
from ..data.masking import IGNORE_INDEX
from ..modeling import causal_lm, decoder_body
from .disk import full_disk_is_reported
from .loss import selective_cross_entropy


class SupervisedTokenCount:
    """A private Trainer hook tunesmith overrides: `Trainer._get_num_items_in_batch`.

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


class AtomicCheckpoints:
    """A second private Trainer hook, `Trainer._save_checkpoint(self, model, trial)`: checkpoints appear whole or
    not at all.

    transformers 5.24 writes checkpoint-N file by file straight into the run folder, so a kill while saving
    leaves a folder that looks like a checkpoint. Here the Trainer saves into `.checkpoint-N.partial/` (by
    pointing `args.output_dir` there for the call) and the finished folder is renamed to `checkpoint-N`;
    only then are old checkpoints rotated out. A partial folder left by a kill is removed at the next save;
    one cut short by a full disk at once, with a one-line error that says so.
    tests/test_crash_safety.py fails if a release renames the hook or stops reading the folder from
    `args.output_dir`.
    """

    def _save_checkpoint(self, model, trial):
        run = Path(self.args.output_dir)
        name = f"checkpoint-{self.state.global_step}"
        staging = run / f".{name}.partial"
        if self.args.should_save:
            for stale in run.glob(".checkpoint-*.partial"):
                shutil.rmtree(stale, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self.args.output_dir = str(staging)
        try:
            with full_disk_is_reported(run, name, partial=staging):
                super()._save_checkpoint(model, trial)
        finally:
            self.args.output_dir = str(run)
        self.accelerator.wait_for_everyone()  # every rank's shards are written before the rename
        if self.args.should_save:
            final = run / name
            if final.exists():  # an incomplete one from an earlier run, passed over by --resume
                shutil.rmtree(final)
            os.replace(staging / name, final)
            staging.rmdir()
            # The Trainer looked for the best checkpoint in the staging folder; it lives in the run folder.
            best = run / f"checkpoint-{self.state.best_global_step}" if self.state.best_global_step else None
            self.state.best_model_checkpoint = str(best) if best is not None and best.is_dir() else None
            rotate_checkpoints(str(run), self.args.save_total_limit, self.state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()


class MethodTrainer(SupervisedTokenCount, AtomicCheckpoints, Trainer):
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

    def _final_hidden(self, model, inputs: dict) -> torch.Tensor:
        """The decoder body's output for the batch. In a multi-process run the call goes through the wrapper
        (DDP, FSDP, DeepSpeed), whose forward arms the gradient sync and gathers shards, with the lm_head on one
        position only; a hook on the body keeps its output."""
        kwargs = {"input_ids": inputs["input_ids"], "attention_mask": inputs.get("attention_mask"),
                  "position_ids": inputs.get("position_ids"), "use_cache": False, **packed_kwargs(inputs)}
        body = decoder_body(self.accelerator.unwrap_model(model))
        if self.args.world_size <= 1:
            return body(**kwargs).last_hidden_state
        seen = []
        handle = body.register_forward_hook(lambda _module, _args, out: seen.append(out.last_hidden_state))
        try:
            model(**kwargs, logits_to_keep=1)
        finally:
            handle.remove()
        return seen[-1]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "position_ids" in inputs:
            # Padding-free rows: the mask is only there for token counting; attention follows position_ids.
            inputs = {k: v for k, v in inputs.items() if k != "attention_mask"}
        if not self.selective_loss:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs["labels"]
        hidden = self._final_hidden(model, inputs)
        head = causal_lm(self.accelerator.unwrap_model(model)).get_output_embeddings()
        normalizer = num_items_in_batch if model.training and num_items_in_batch else None
        if normalizer is not None and self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            # The count covers every rank and DDP averages the ranks' gradients, so each rank's sum is divided by
            # count / ranks (Trainer.compute_loss scales its loss the same way): the single-process gradient.
            normalizer = normalizer / self.accelerator.num_processes
        loss, _ = selective_cross_entropy(hidden, head.weight, labels, normalizer)
        if model.training and self.loss_terms:
            # Terms see the same normaliser as the SFT sum (supervised tokens of the accumulated batch).
            term_inputs = {**inputs, "num_items_in_batch": normalizer}
            for term in self.loss_terms:
                loss = loss + term(model, term_inputs, hidden)
        return (loss, {"loss": loss}) if return_outputs else loss
