"""Packed attention: one padding-free row with example boundaries gives each example exactly the logits and
gradients it gets alone, and anything without boundaries runs plain sdpa."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tunesmith.data.collate import PACKED_KEYS, PaddingCollator, PaddingFreeCollator
from tunesmith.training import attention
from tunesmith.training.attention import NAME, ShortCausalAttention, restore_attention, use_packed_attention


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


@pytest.mark.parametrize("heads, kv_heads, n", [(4, 4, 1), (4, 2, 7), (9, 3, 40)])
def test_short_causal_attention_equals_fp64_sdpa(heads, kv_heads, n):
    """Output and gradients of the short-example path against sdpa in fp64 (an independent reference), from bf16
    inputs as training feeds it, no looser than sdpa's own bf16 kernel is."""
    torch.manual_seed(0)
    base = [torch.randn(1, h, n, 16, dtype=torch.bfloat16) for h in (heads, kv_heads, kv_heads)]
    grad = torch.randn(1, heads, n, 16, dtype=torch.bfloat16)
    errors = {}
    for name in ("fp64", "sdpa", "short"):
        q, k, v = [(t.double() if name == "fp64" else t.clone()).requires_grad_() for t in base]
        if name == "short":
            out = ShortCausalAttention.apply(q, k, v, 0.25)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25, enable_gqa=heads != kv_heads)
        out.backward(grad.to(out.dtype))
        got = [out, q.grad, k.grad, v.grad]
        if name == "fp64":
            reference = got
            continue
        assert all(g.dtype == torch.bfloat16 for g in got)
        errors[name] = max((g.double() - r).abs().max().item() for g, r in zip(got, reference))
    assert errors["short"] <= max(errors["sdpa"], 2e-2), errors


def test_short_causal_attention_keeps_what_the_flash_kernel_keeps():
    """The memory bill (planning/activations.py) counts q, k, v, output and logsumexp: the short path saves
    those and no (n x n) score matrix."""
    torch.manual_seed(0)
    q, k, v = [torch.randn(1, h, 64, 16, dtype=torch.bfloat16, requires_grad=True) for h in (6, 2, 2)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ShortCausalAttention.apply(q, k, v, 0.25)
    assert sorted(t.numel() for t in saved) == sorted([q.numel(), k.numel(), v.numel(), q.numel(), 6 * 64])


def test_packed_rows_send_short_examples_to_the_short_path_and_long_ones_to_sdpa(monkeypatch):
    calls = []
    monkeypatch.setattr(ShortCausalAttention, "apply", lambda *a: calls.append("short") or a[0])
    real_sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append("sdpa") or real_sdpa(*a, **k))
    n_short, n_long = 5, attention.SHORT + 1
    q, k, v = [torch.randn(1, 2, n_short + n_long, 8) for _ in range(3)]
    bounds = torch.tensor([0, n_short, n_short + n_long])
    attention.packed_sdpa_forward(None, q, k, v, None, cu_seq_lens_q=bounds)
    assert calls == ["short", "sdpa"]
