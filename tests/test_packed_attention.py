"""Packed attention: one padding-free row with example boundaries gives each example exactly the logits and
gradients it gets alone, and anything without boundaries runs plain sdpa."""
from __future__ import annotations

import torch

from tunesmith.data.collate import PACKED_KEYS, PaddingCollator, PaddingFreeCollator
from tunesmith.training.attention import NAME, restore_attention, use_packed_attention


def _model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False  # as in training: transformers only reads packed position ids without a cache
    return model


def _examples(lengths=(7, 12, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(5, 1000, (n,), generator=g).tolist(), "labels": [1] * n} for n in lengths]


def test_packed_row_equals_each_example_alone(tiny_model_dir):
    model = _model(tiny_model_dir)
    examples = _examples()
    batch = PaddingFreeCollator()(examples)
    assert batch["cu_seq_lens_q"].tolist() == [0, 7, 19, 24] and batch["max_length_q"] == 12
    alone = [model(input_ids=torch.tensor([e["input_ids"]])).logits[0] for e in examples]

    previous = use_packed_attention(model)
    assert previous == "sdpa" and model.config._attn_implementation == NAME
    packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                   **{k: batch[k] for k in PACKED_KEYS}).logits[0]
    assert torch.allclose(packed, torch.cat(alone), atol=1e-5)
    restore_attention(model, previous)
    assert model.config._attn_implementation == "sdpa"


def test_packed_gradients_equal_block_diagonal_mask(tiny_model_dir):
    """The same row through transformers' block-diagonal sdpa mask (no boundaries given) and through the
    per-example path: same loss, same gradients."""
    batch = PaddingFreeCollator()(_examples())
    grads = []
    for packed in (False, True):
        model = _model(tiny_model_dir)
        extra = {k: batch[k] for k in PACKED_KEYS} if packed else {}
        if packed:
            use_packed_attention(model)
        loss = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["input_ids"],
                     **extra).loss
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (l0, g0), (l1, g1) = grads
    assert torch.allclose(l0, l1, atol=1e-6)
    for n in g0:
        assert torch.allclose(g0[n], g1[n], atol=1e-5), n


def test_padded_batches_keep_plain_sdpa(tiny_model_dir):
    model = _model(tiny_model_dir)
    batch = PaddingCollator(0)(_examples())
    before = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    use_packed_attention(model)
    after = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(before, after)


def test_other_attention_implementations_are_left_alone(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), attn_implementation="eager")
    assert use_packed_attention(model) is None and model.config._attn_implementation == "eager"
