"""The selective-logit chunked loss and padding-free batches against plain PyTorch references."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tunesmith.data.collate import PaddingCollator, PaddingFreeCollator
from tunesmith.data.masking import IGNORE_INDEX
from tunesmith.modeling import supports_selective_loss
from tunesmith.training.loss import selective_cross_entropy


def reference_loss(hidden, weight, labels):
    logits = hidden @ weight.T  # the full (tokens x vocabulary) matrix the fast path never builds
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, weight.shape[0]), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
    )


@pytest.mark.parametrize("chunk_rows", [1, 3, 7, 1024])
@pytest.mark.parametrize("weight_trains", [False, True])
def test_selective_loss_equals_full_cross_entropy(chunk_rows, weight_trains):
    torch.manual_seed(0)
    B, T, H, V = 3, 11, 16, 97
    hidden = torch.randn(B, T, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=weight_trains)
    labels = torch.randint(0, V, (B, T))
    labels[:, :4] = IGNORE_INDEX  # a prompt
    labels[2, 8:] = IGNORE_INDEX  # padding
    loss, count = selective_cross_entropy(hidden, weight, labels, chunk_rows=chunk_rows)
    loss.backward()
    got_h = hidden.grad.clone()
    got_w = weight.grad.clone() if weight_trains else None
    hidden.grad = None
    weight.grad = None
    ref = reference_loss(hidden, weight, labels)
    ref.backward()
    assert count == int((labels[:, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_h, hidden.grad, atol=1e-5, rtol=1e-5)
    if weight_trains:
        torch.testing.assert_close(got_w, weight.grad, atol=1e-5, rtol=1e-5)


def test_normalizer_makes_accumulated_micro_batches_equal_one_batch():
    torch.manual_seed(1)
    hidden = torch.randn(4, 9, 8, requires_grad=True)
    weight = torch.randn(30, 8)
    labels = torch.randint(0, 30, (4, 9))
    labels[:2, :6] = IGNORE_INDEX
    total = int((labels[:, 1:] != IGNORE_INDEX).sum())
    a, _ = selective_cross_entropy(hidden[:2], weight, labels[:2], normalizer=total)
    b, _ = selective_cross_entropy(hidden[2:], weight, labels[2:], normalizer=total)
    (a + b).backward()
    accumulated = hidden.grad.clone()
    hidden.grad = None
    reference_loss(hidden, weight, labels).backward()
    torch.testing.assert_close(accumulated, hidden.grad, atol=1e-6, rtol=1e-5)


def test_no_supervised_token_gives_a_zero_loss_with_a_graph():
    hidden = torch.randn(1, 5, 4, requires_grad=True)
    loss, count = selective_cross_entropy(hidden, torch.randn(7, 4), torch.full((1, 5), IGNORE_INDEX))
    assert count == 0 and loss.item() == 0.0
    loss.backward()


def test_eval_under_no_grad_computes_no_gradients():
    hidden = torch.randn(2, 6, 4, requires_grad=True)
    labels = torch.randint(0, 7, (2, 6))
    with torch.no_grad():
        loss, _ = selective_cross_entropy(hidden, torch.randn(7, 4), labels)
    assert not loss.requires_grad


def examples(n=3):
    torch.manual_seed(2)
    out = []
    for i in range(n):
        length = 6 + 3 * i
        ids = torch.randint(3, 900, (length,)).tolist()
        labels = [IGNORE_INDEX] * 3 + ids[3:]
        out.append({"input_ids": ids, "labels": labels})
    return out


def per_example_losses_padded(model, feats):
    batch = PaddingCollator(pad_token_id=2)(feats)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    losses = []
    for row, f in enumerate(feats):
        n = len(f["input_ids"])
        losses.append(torch.nn.functional.cross_entropy(logits[row, : n - 1], batch["labels"][row, 1:n], ignore_index=IGNORE_INDEX, reduction="sum"))
    return torch.stack(losses)


def per_example_losses_packed(model, feats):
    batch = PaddingFreeCollator()(feats)
    assert batch["input_ids"].shape == (1, sum(len(f["input_ids"]) for f in feats))
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
    losses, start = [], 0
    for f in feats:
        n = len(f["input_ids"])
        losses.append(torch.nn.functional.cross_entropy(logits[start : start + n - 1], batch["labels"][0, start + 1 : start + n], ignore_index=IGNORE_INDEX, reduction="sum"))
        start += n
    return torch.stack(losses)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_per_example_equals_unpacked(tiny_model_dir, attn):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn).eval()
    feats = examples()
    with torch.no_grad():
        torch.testing.assert_close(per_example_losses_packed(model, feats), per_example_losses_padded(model, feats), atol=1e-4, rtol=1e-5)


def test_packed_rows_never_learn_the_next_examples_start():
    batch = PaddingFreeCollator()([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}])
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]


def test_trainer_loss_equals_the_models_own_loss(tiny_recipe, tiny_model_dir):
    from tunesmith.config import load_config
    from tunesmith.training.run import training_arguments
    from tunesmith.training.trainer import MethodTrainer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert supports_selective_loss(model)
    config = load_config(tiny_recipe)
    trainer = MethodTrainer(model=model, args=training_arguments(config, config.output_dir, False), selective_loss=True)
    feats = examples()
    batch = PaddingCollator(pad_token_id=2)(feats)
    model.eval()
    with torch.no_grad():
        ours = trainer.compute_loss(model, dict(batch))
        theirs = model(**batch).loss
        packed = trainer.compute_loss(model, PaddingFreeCollator()(feats))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed, theirs, atol=1e-4, rtol=1e-5)
