"""The private transformers hook MethodTrainer overrides, checked against the installed transformers.

`Trainer._get_num_items_in_batch` is not public API: a minor release may rename it, change its parameters or
stop calling it, and our loss normaliser would then silently fall back to transformers' own. These tests say
so loudly instead (see SupervisedTokenCount in tunesmith/training/trainer.py).
"""
from __future__ import annotations

import inspect

from transformers import AutoModelForCausalLM, Trainer

from tunesmith.config import load_config
from tunesmith.data.collate import PaddingCollator
from tunesmith.training.run import ExampleDataset, training_arguments
from tunesmith.training.trainer import MethodTrainer

# (input_ids, labels): supervised next-token targets are the labels after position 0 that are not -100
EXAMPLES = [
    ([1, 2, 3, 4], [-100, -100, 3, 4]),  # 2
    ([5, 6, 7], [5, 6, 7]),  # 2: position 0 is never a next-token target
    ([8, 9, 10, 11, 12], [-100, 9, 10, 11, 12]),  # 4
    ([13, 14], [-100, 14]),  # 1
]
SUPERVISED = 2 + 2 + 4 + 1


def test_the_hook_keeps_its_name_and_parameters():
    hook = getattr(Trainer, "_get_num_items_in_batch", None)
    assert hook is not None, "transformers renamed Trainer._get_num_items_in_batch: update SupervisedTokenCount"
    assert list(inspect.signature(hook).parameters) == ["self", "batch_samples", "device"], (
        "Trainer._get_num_items_in_batch changed its parameters: update SupervisedTokenCount"
    )


def test_one_training_step_counts_through_the_hook(tiny_recipe, tiny_model_dir, tmp_path, monkeypatch):
    """Two micro batches of two examples make one optimizer step: the loop calls the hook once with both,
    and both micro batches' losses are divided by the supervised targets of all four examples."""
    calls, normalisers = [], []
    hook, loss = MethodTrainer._get_num_items_in_batch, MethodTrainer.compute_loss

    def hook_spy(self, batch_samples, device):
        count = hook(self, batch_samples, device)
        calls.append((len(batch_samples), int(count)))
        return count

    def loss_spy(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            normalisers.append(num_items_in_batch)
        return loss(self, model, inputs, return_outputs, num_items_in_batch)

    monkeypatch.setattr(MethodTrainer, "_get_num_items_in_batch", hook_spy)
    monkeypatch.setattr(MethodTrainer, "compute_loss", loss_spy)
    config = load_config(tiny_recipe, ["train.max_steps=1", "train.batch_size=2", "train.grad_accum=2",
                                       "train.save_steps=100", "train.order=sequential"])
    trainer = MethodTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        args=training_arguments(config, tmp_path / "out", False),
        train_dataset=ExampleDataset([_Example(ids, labels) for ids, labels in EXAMPLES]),
        data_collator=PaddingCollator(pad_token_id=0),
        selective_loss=True,
    )
    trainer.train()
    assert calls == [(2, SUPERVISED)]
    assert [int(n) for n in normalisers] == [SUPERVISED, SUPERVISED]


class _Example:
    def __init__(self, input_ids: list[int], labels: list[int]):
        self.input_ids, self.labels = input_ids, labels
