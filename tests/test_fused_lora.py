"""The fused LoRA branch: same outputs and gradients as plain autograd and as PEFT, fewer saved activations."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import keep_mask, peft_model_with_random_b, saved_bytes
from tunesmith.methods.fused_lora import apply_keep_bits, keep_bits, lora_branch, use_fused_lora


def _tensors(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 5, 12, generator=g, requires_grad=True)
    a = torch.randn(4, 12, generator=g, requires_grad=True)
    b = torch.randn(7, 4, generator=g, requires_grad=True)
    return x, a, b


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_branch_matches_plain_autograd_with_the_same_mask(p):
    x, a, b = _tensors()
    torch.manual_seed(1)
    out = lora_branch(x, a, b, 2.0, p)
    grad_out = torch.randn_like(out)
    ours = torch.autograd.grad(out, (x, a, b), grad_out)

    x2, a2, b2 = _tensors()
    torch.manual_seed(1)
    mask, keep = keep_mask(x2, p) if p else (torch.ones_like(x2, dtype=torch.bool), 1.0)
    ref = ((x2 * mask / keep) @ a2.t() @ b2.t()) * 2.0
    reference = torch.autograd.grad(ref, (x2, a2, b2), grad_out)
    assert torch.allclose(out, ref, atol=1e-5)
    for mine, theirs in zip(ours, reference):
        assert torch.allclose(mine, theirs, atol=1e-5)
    if p:
        assert 0 < (~mask).float().mean() < 0.5  # the mask really drops entries


def test_keep_mask_is_an_unbiased_bernoulli_mask():
    torch.manual_seed(0)
    x = torch.empty(1000, 1000)
    mask, keep = keep_mask(x, 0.05)
    assert mask.dtype == torch.bool and mask.shape == x.shape
    assert keep == 1 - 1638 / 32768  # p rounded to a multiple of 1/32768
    share = mask.float().mean().item()
    assert abs(share - keep) < 5 * (keep * (1 - keep) / x.numel()) ** 0.5  # within 5 standard errors
    rows = mask.float().mean(dim=1)  # no position is favoured: every row keeps about the same share
    assert rows.std().item() < 2 * (keep * (1 - keep) / 1000) ** 0.5
    assert not torch.equal(mask, keep_mask(x, 0.05)[0])  # fresh draws each call


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_keep_bits_zero_exactly_the_dropped_entries(dtype):
    torch.manual_seed(0)
    x = torch.randn(64, 48).to(dtype)
    x[0, :4] = torch.tensor([float("nan"), float("inf"), -0.0, -1e-30]).to(dtype)
    bits, _ = keep_bits(x, 0.3)
    assert bits.dtype == torch.int16 and set(bits.unique().tolist()) == {-1, 0}
    expected = torch.where(bits != 0, x, torch.zeros((), dtype=dtype))
    assert torch.equal(apply_keep_bits(x, bits).view(torch.uint8), expected.view(torch.uint8))  # bit for bit


def test_branch_keeps_the_dropout_mask_at_one_byte_per_entry():
    x, a, b = _tensors()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        lora_branch(x, a, b, 2.0, 0.25)
    masks = [t for t in saved if t.shape == x.shape and not t.is_floating_point()]
    assert [m.dtype for m in masks] == [torch.int8]


class _MatmulDtypes(TorchDispatchMode):
    """Records the dtypes the matrix multiplications inside the block run in."""

    def __enter__(self):
        self.dtypes = set()
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.addmm.default):
            self.dtypes.add(args[0].dtype)
        return func(*args, **(kwargs or {}))


def test_branch_under_bf16_autocast_equals_autocast_autograd():
    """Under autocast the branch's backward runs in bf16, as autograd runs PEFT's layers: the gradients equal
    plain autograd of the same expression under autocast (bf16 rounding is the only tolerance)."""
    x, a, b = _tensors(3)
    x = x.detach().to(torch.bfloat16).requires_grad_()
    grad_out = torch.randn(2, 5, 7).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(4)
        out = lora_branch(x, a, b, 2.0, 0.25)
    with _MatmulDtypes() as seen:
        ours = torch.autograd.grad(out, (x, a, b), grad_out)
    assert seen.dtypes == {torch.bfloat16}  # no fp32 copies of x or of the gradient in backward
    torch.manual_seed(4)
    mask, keep = keep_mask(x, 0.25)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = (((x * mask) @ a.t()) * (1.0 / keep) @ b.t()) * 2.0
    reference = torch.autograd.grad(ref, (x, a, b), grad_out)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    for mine, theirs in zip(ours, reference):
        assert mine.dtype == theirs.dtype
        torch.testing.assert_close(mine, theirs, rtol=2e-2, atol=2e-2)


def test_fused_peft_model_equals_peft(tiny_model_dir):
    ids = torch.randint(0, 1000, (2, 9))
    results = []
    for fused in (False, True):
        model = peft_model_with_random_b(tiny_model_dir, 0.0)
        layers = use_fused_lora(model).layers if fused else 0
        model.train()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads, layers))
    (loss0, grads0, _), (loss1, grads1, layers) = results
    assert layers == 2 * 7  # every projection of both layers
    assert torch.allclose(loss0, loss1, atol=1e-6)
    assert grads0.keys() == grads1.keys()
    for n in grads0:
        assert torch.allclose(grads0[n], grads1[n], atol=1e-6), n


def test_no_grad_runs_peft_forward_and_state_dict_is_unchanged(tiny_model_dir):
    model = peft_model_with_random_b(tiny_model_dir, 0.1)
    keys = set(model.state_dict())
    ids = torch.randint(0, 1000, (1, 6))
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    use_fused_lora(model)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)
    assert set(model.state_dict()) == keys


def test_fused_branch_keeps_fewer_activations_with_dropout(tiny_model_dir):
    ids = torch.randint(0, 1000, (4, 64))
    peft_model = peft_model_with_random_b(tiny_model_dir, 0.1).train()
    fused = peft_model_with_random_b(tiny_model_dir, 0.1).train()
    use_fused_lora(fused)
    peft_bytes, fused_bytes = saved_bytes(peft_model, ids), saved_bytes(fused, ids)
    assert fused_bytes < 0.8 * peft_bytes, (fused_bytes, peft_bytes)


def _lora_layers(model) -> list:
    from peft.tuners.lora.layer import Linear

    return [m for m in model.modules() if isinstance(m, Linear)]


def test_leaving_the_context_gives_back_pefts_own_forward(tiny_model_dir):
    """After the block no layer keeps an instance `forward`, and a training forward with dropout (where the
    fused branch would draw other masks) equals that of a model that was never fused, bit for bit."""
    from peft.tuners.lora.layer import Linear

    ids = torch.randint(0, 1000, (2, 9))
    model = peft_model_with_random_b(tiny_model_dir, 0.1).train()
    with use_fused_lora(model) as fused:
        assert fused.layers == 2 * 7
        assert all("forward" in layer.__dict__ for layer in _lora_layers(model))
        model(input_ids=ids).logits.sum().backward()
    for layer in _lora_layers(model):
        assert "forward" not in layer.__dict__
        assert type(layer).forward is Linear.forward and layer.forward.__func__ is Linear.forward
    never_fused = peft_model_with_random_b(tiny_model_dir, 0.1).train()
    torch.manual_seed(3)
    after = model(input_ids=ids).logits
    torch.manual_seed(3)
    peft_only = never_fused(input_ids=ids).logits
    assert torch.equal(after, peft_only)


def test_lora_bias_is_refused_before_any_layer_is_swapped(tiny_model_dir):
    from tunesmith.errors import TunesmithError

    model = peft_model_with_random_b(tiny_model_dir, 0.0)
    _lora_layers(model)[-1].lora_bias["default"] = True  # one layer with a bias, found after the others
    with pytest.raises(TunesmithError, match="does not support LoRA bias"):
        use_fused_lora(model)
    assert not any("forward" in layer.__dict__ for layer in _lora_layers(model))


def test_fast_path_undo_restores_pefts_forward_and_the_attention(tiny_recipe):
    """training.run.use_fast_path installs both switches; its one undo takes both back."""
    from tunesmith.config import load_config
    from tunesmith.methods import prepare_model
    from tunesmith.modeling import causal_lm
    from tunesmith.models import load_model
    from tunesmith.training.run import use_fast_path

    config = load_config(tiny_recipe)
    prepared = prepare_model(load_model(config.model), config, total_steps=1)
    attention = lambda: causal_lm(prepared.model).config._attn_implementation  # noqa: E731
    assert attention() == "sdpa"
    undo = use_fast_path(prepared, config)
    assert attention() != "sdpa"
    assert all("forward" in layer.__dict__ for layer in _lora_layers(prepared.model))
    undo()
    assert attention() == "sdpa"
    assert not any("forward" in layer.__dict__ for layer in _lora_layers(prepared.model))
