"""The default fast training path as a whole, against the plain path it replaces.

Selective loss, padding-free rows and the fused LoRA branch each have their own unit tests; here short
runs on the tiny model check that switching them (all together), gradient accumulation and gradient
checkpointing change neither the per-step losses and gradient norms nor the final adapter. The reference
is always the other run: the plain path is transformers' and PEFT's own code.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tunesmith.config import load_config
from tunesmith.training.run import train

from helpers import write_jsonl

FAST_PATH = ("selective_loss", "padding_free", "fused_lora")


def run(tmp: Path, model_dir: Path, name: str, *, dropout: float | None = None, **train_keys) -> tuple[list[dict], dict]:
    """A 3-step LoRA run on 12 booking examples; returns its metrics.jsonl loss rows and its adapter tensors."""
    from tunesmith.demo.booking import generate

    rows, _ = generate(n_train=12, n_eval=1, seed=1)
    data = write_jsonl(tmp / "train.jsonl", rows)
    method = {"name": "lora", "r": 4, "alpha": 8}
    if dropout is not None:
        method["dropout"] = dropout
    recipe = {
        "model": str(model_dir),
        "data": {"train": str(data), "eval_split": 0.0, "max_length": 256},
        "method": method,
        "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-3, "warmup": 0, "logging_steps": 1, "save_steps": 100,
                  "bf16": False, **train_keys},
        "output_dir": str(tmp / name),
    }
    out = train(load_config(recipe), progress=False).output_dir
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in logged if "loss" in r], load_file(out / "adapter_model.safetensors")


def assert_same_training(a: tuple[list[dict], dict], b: tuple[list[dict], dict]) -> None:
    """Equal per-step losses and gradient norms (relative 1e-6; float32 reordering gives ~1e-7), equal adapters
    (absolute 2e-6 on entries ~2e-3; measured ~2e-7). The gradient norm matters: AdamW's update hardly changes
    when every gradient is scaled by the same factor, so the adapters alone would miss a wrong normaliser."""
    (rows_a, adapter_a), (rows_b, adapter_b) = a, b
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b] == [1, 2, 3]
    for ra, rb in zip(rows_a, rows_b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-6), f"loss at step {ra['step']}"
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-6), f"grad norm at step {ra['step']}"
    assert adapter_a.keys() == adapter_b.keys()
    # The runs trained (lora_B starts at zero), so equal adapters mean equal updates.
    assert all(adapter_a[k].abs().max() > 1e-4 for k in adapter_a if "lora_B" in k)
    for k in adapter_a:
        torch.testing.assert_close(adapter_b[k], adapter_a[k], rtol=0, atol=2e-6, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.slow
def test_fast_path_equals_plain_path(tmp_path, tiny_model_dir):
    """Selective loss + padding-free rows + fused LoRA (the default) against full logits, padded batches and
    PEFT's forward. Dropout 0: the fused branch draws its dropout mask from another random stream."""
    fast = run(tmp_path, tiny_model_dir, "fast", dropout=0.0, **{k: True for k in FAST_PATH})
    plain = run(tmp_path, tiny_model_dir, "plain", dropout=0.0, **{k: False for k in FAST_PATH})
    assert_same_training(plain, fast)


@pytest.mark.slow
def test_fused_lora_with_dropout_equals_peft_with_the_same_masks(tmp_path, tiny_model_dir, monkeypatch):
    """Default config (LoRA dropout 0.05): the fused branch against PEFT's lora_B(lora_A(dropout(x))) * s with
    inverted dropout x * mask / keep written here. Only the masks are shared: PEFT's dropout draws them with
    the fused branch's generator, which takes the same random stream in the same layer order."""
    from helpers import keep_mask

    fused = run(tmp_path, tiny_model_dir, "fused", fused_lora=True)

    def same_mask_dropout(self, x):
        if not self.training:
            return x
        mask, keep = keep_mask(x, self.p)
        return x * mask / keep

    monkeypatch.setattr(torch.nn.Dropout, "forward", same_mask_dropout)
    peft = run(tmp_path, tiny_model_dir, "peft", fused_lora=False)
    assert_same_training(peft, fused)


@pytest.mark.slow
@pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "plain"])
def test_grad_accum_equals_one_big_batch(tmp_path, tiny_model_dir, fast_path):
    """2 micro batches of 2 per step equal 1 batch of 4: the loss is divided by the supervised tokens of the
    whole step, not averaged per micro batch (the examples differ in length, so the two differ). Same examples
    per step (sequential order), dropout 0 (masks are drawn per micro batch)."""
    switches = {k: fast_path for k in FAST_PATH}
    big = run(tmp_path, tiny_model_dir, "big", dropout=0.0, order="sequential", batch_size=4, grad_accum=1, **switches)
    accum = run(tmp_path, tiny_model_dir, "accum", dropout=0.0, order="sequential", batch_size=2, grad_accum=2, **switches)
    assert_same_training(big, accum)


@pytest.mark.slow
def test_gradient_checkpointing_changes_nothing(tmp_path, tiny_model_dir, monkeypatch):
    """Default config (LoRA dropout on, shuffled order, fast path): recomputing activations in
    backward replays the same dropout masks, so the run is the same. The MLPs running twice as often shows
    the layers really were recomputed."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    calls, forward = [], LlamaMLP.forward
    monkeypatch.setattr(LlamaMLP, "forward", lambda self, x: (calls.append(1), forward(self, x))[1])
    plain = run(tmp_path, tiny_model_dir, "plain", gradient_checkpointing=False)
    once = len(calls)
    checkpointed = run(tmp_path, tiny_model_dir, "checkpointed", gradient_checkpointing=True)
    assert once == 3 * 2 and len(calls) - once == 2 * once  # 3 steps x 2 layers, then each twice
    assert_same_training(plain, checkpointed)
