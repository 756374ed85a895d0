"""The fused DoRA branch: PEFT's DoRA outputs and gradients, a weight norm from low-rank terms, fewer saved
activations."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import keep_mask, peft_model_with_random_b, saved_bytes
from tunesmith.methods.fused_dora import dora_weight_norm, row_norms_squared
from tunesmith.methods.fused_lora import use_fused_lora


def _norm_case(seed: int, w_scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(40, 48, generator=g) * w_scale
    a = torch.randn(4, 48, generator=g) * 0.1
    b = torch.randn(40, 4, generator=g) * 0.1
    return w, a, b


def _assembled_norm(w, a, b, s):
    """The paper's ||W0 + s B A|| per output row, from the assembled matrix, in float64."""
    return torch.linalg.norm(w.double() + s * b.double() @ a.double(), dim=1)


@pytest.mark.parametrize("w_scale", [1.0, 1000.0])
def test_weight_norm_equals_the_norm_of_the_assembled_rows(w_scale):
    """w_scale 1000: W0's rows dominate the low-rank terms by 1e3-1e6. The sum is taken in float64, so the
    fp32 rounding of the r-wide products is relative to themselves: 1e-8, below the 3e-8 an fp32 norm
    (PEFT's) rounds to."""
    w, a, b = _norm_case(0, w_scale)
    ours = dora_weight_norm(row_norms_squared(w), w, a, b, 2.0)
    reference = _assembled_norm(w, a, b, 2.0)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, reference, rtol=1e-8, atol=0)
    update = (reference - _assembled_norm(w, a, b, 0.0)).abs() / reference
    assert update.mean() > 1e-6  # the update moves the norm far beyond the tolerance


@pytest.mark.parametrize("cancelled", [0.5, 0.9, 0.99])
def test_weight_norm_error_where_the_update_cancels_most_of_w0(cancelled):
    """Rows where s B A cancels half to 99% of W0 (training does not go there: DoRA moves the scale into m). The
    fp32 products then round at the size of ||W0_i||^2, so the relative error is stated as a multiple of
    ||W0_i||^2 / n_i^2: below 1e-6 of it here (d_in 48), against float64."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(4, 48, generator=g) * 0.1
    b = torch.randn(40, 4, generator=g) * 0.1
    w = -cancelled * 2.0 * (b @ a) + 0.001 * torch.randn(40, 48, generator=g)
    reference = _assembled_norm(w, a, b, 2.0)
    error = (dora_weight_norm(row_norms_squared(w), w, a, b, 2.0) - reference).abs() / reference
    dominance = torch.linalg.norm(w.double(), dim=1).square() / reference.square()
    assert (error < 1e-6 * dominance).all(), (error / dominance).max()


class _FixedDropout(torch.nn.Module):
    """Dropout with a given mask, so PEFT's layer drops the same entries as the fused branch."""

    def __init__(self, mask, keep):
        super().__init__()
        self.mask, self.keep = mask, keep

    def forward(self, x):
        return x * self.mask / self.keep


def _dora_layer(bias: bool, dropout: float):
    """One PEFT DoRA layer (12 -> 7, r 4, alpha 8) with non-zero B and a magnitude away from the norm, so
    every term and gradient is exercised; the base is frozen as get_peft_model freezes it."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 7, bias=bias))
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["0"], use_dora=True,
                        init_lora_weights="gaussian")
    model = get_peft_model(model, config)
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(std=0.3)
        layer.lora_magnitude_vector["default"].weight.mul_(torch.linspace(0.5, 1.5, 7))
    return model.train(), layer


def _run(model, layer, x, grad_out):
    out = model(x)
    params = (x, layer.lora_A["default"].weight, layer.lora_B["default"].weight,
              layer.lora_magnitude_vector["default"].weight)
    return (out, *torch.autograd.grad(out, params, grad_out))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_fused_dora_layer_equals_pefts_output_and_every_gradient(bias, p):
    """Output and the gradients of x, A, B and the magnitude equal PEFT's DoRA layer on the same dropout mask
    (with dropout PEFT runs W0 on the dropped-out input; without, it reuses the base output minus the bias)."""
    peft_model, peft_layer = _dora_layer(bias, p)
    fused_model = copy.deepcopy(peft_model)
    fused_layer = fused_model.base_model.model[0]
    x = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(2), requires_grad=True)
    grad_out = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(3))
    if p:
        torch.manual_seed(4)
        mask, keep = keep_mask(x, p)
        assert 0 < (~mask).float().mean() < 0.5  # the mask really drops entries
        peft_layer.lora_dropout["default"] = _FixedDropout(mask, keep)
    theirs = _run(peft_model, peft_layer, x, grad_out)
    with use_fused_lora(fused_model) as fused:
        assert fused.layers == 1
        torch.manual_seed(4)  # the fused branch draws the same mask
        ours = _run(fused_model, fused_layer, x, grad_out)
    for name, mine, reference in zip(("output", "x", "A", "B", "magnitude"), ours, theirs):
        torch.testing.assert_close(mine, reference, rtol=1e-5, atol=1e-6, msg=name)
        assert reference.abs().max() > 1e-3, name  # a real gradient, not zeros on both sides


class _Shapes(TorchDispatchMode):
    """Records the shape of every new tensor the operations inside the block produce (views are not new)."""

    def __enter__(self):
        self.shapes = set()
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and not func.is_view:  # W^T is W's memory
                self.shapes.add(tuple(t.shape))
        return out


def test_fused_forward_and_backward_build_no_weight_sized_tensor():
    """PEFT assembles W0 + s B A (d_out x d_in) from an identity matrix (d_in x d_in) in every forward; the
    fused branch's widest tensors are tokens x d_out and tokens x d_in."""
    model, layer = _dora_layer(bias=True, dropout=0.25)
    x = torch.randn(1, 3, 12, requires_grad=True)
    with use_fused_lora(model), _Shapes() as seen:
        model(x).sum().backward()
    assert not {(7, 12), (12, 7), (12, 12)} & seen.shapes


def test_fused_dora_model_equals_peft(tiny_model_dir):
    ids = torch.randint(0, 1000, (2, 9))
    results = []
    for fused in (False, True):
        model = peft_model_with_random_b(tiny_model_dir, 0.0, use_dora=True).train()
        handle = use_fused_lora(model) if fused else None
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads, handle.layers if handle else 0))
    (loss0, grads0, _), (loss1, grads1, layers) = results
    assert layers == 2 * 7  # every projection of both layers
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=1e-6)
    assert grads0.keys() == grads1.keys() and any("magnitude" in n for n in grads0)
    for n in grads0:
        torch.testing.assert_close(grads1[n], grads0[n], rtol=1e-4, atol=1e-6, msg=n)


class _MatmulDtypes(TorchDispatchMode):
    def __enter__(self):
        self.dtypes = set()
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            self.dtypes.add(args[1].dtype)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
def test_fused_dora_under_bf16_autocast_equals_peft_under_autocast(base_dtype):
    """Under autocast the fused layer runs its matmuls, backward too, in bf16 as autograd runs PEFT's; outputs
    and gradients equal PEFT's under autocast within bf16 rounding (relative to each tensor's norm: single
    entries of a sum that cancels carry the rounding of its larger terms). With a bf16 base (train.bf16
    loads the frozen weights in bf16) x is bf16 too, and PEFT takes the norm of a bf16 W0 + s B A."""
    peft_model, peft_layer = _dora_layer(bias=True, dropout=0.0)
    peft_layer.get_base_layer().to(base_dtype)
    fused_model = copy.deepcopy(peft_model)
    x = torch.randn(4, 6, 12, generator=torch.Generator().manual_seed(2)).to(base_dtype).requires_grad_()
    grad_out = torch.randn(4, 6, 7, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    results = []
    for model in (peft_model, fused_model):
        layer = model.base_model.model[0]
        with use_fused_lora(model) if model is fused_model else torch.enable_grad():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x)
            with _MatmulDtypes() as seen:
                grads = torch.autograd.grad(out, (x, layer.lora_A["default"].weight, layer.lora_B["default"].weight,
                                                  layer.lora_magnitude_vector["default"].weight), grad_out)
        results.append((out, *grads))
    assert seen.dtypes == {torch.bfloat16}
    for name, mine, theirs in zip(("output", "x", "A", "B", "magnitude"), results[1], results[0]):
        assert mine.dtype == theirs.dtype, name
        error = ((mine.float() - theirs.float()).norm() / theirs.float().norm()).item()
        assert error < 1e-2, (name, error)  # bf16 rounds at 4e-3


@pytest.mark.parametrize("dropout,share_of_peft", [(0.0, 0.8), (0.1, 0.65)])
def test_fused_dora_keeps_what_fused_lora_keeps_plus_one_output_wide_tensor(tiny_model_dir, dropout, share_of_peft):
    """Per adapted layer: fused LoRA's saves (x, the mask, the rank-r activation) plus z + s B A u
    (tokens x d_out) and the d_out vectors c and n, all fp32 here; and well under PEFT's DoRA."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.layer import Linear
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 1000, (4, 64))
    dora = peft_model_with_random_b(tiny_model_dir, dropout, use_dora=True).train()
    peft_bytes = saved_bytes(dora, ids)
    use_fused_lora(dora)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear",
                                           task_type="CAUSAL_LM")).train()
    use_fused_lora(lora)
    outs = [m.out_features for m in lora.modules() if isinstance(m, Linear)]
    assert len(outs) == 2 * 7  # the adapted projections
    extra = sum((ids.numel() * d_out + 2 * d_out) * 4 for d_out in outs)
    assert saved_bytes(dora, ids) == saved_bytes(lora, ids) + extra
    assert saved_bytes(dora, ids) < share_of_peft * peft_bytes


def test_no_grad_runs_peft_forward_and_the_handle_gives_it_back(tiny_model_dir):
    from peft.tuners.lora.layer import Linear

    model = peft_model_with_random_b(tiny_model_dir, 0.1, use_dora=True)
    keys = set(model.state_dict())
    ids = torch.randint(0, 1000, (1, 6))
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    with use_fused_lora(model):
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, before)
    layers = [m for m in model.modules() if isinstance(m, Linear)]
    assert layers and not any("forward" in layer.__dict__ for layer in layers)
    assert set(model.state_dict()) == keys
