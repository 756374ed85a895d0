"""The merge methods as pure functions, against tensors computed by hand."""
from __future__ import annotations

import math

import pytest
import torch

from tunesmith.merging import methods as M
from tunesmith.merging.run import layer_position, tensor_seed


def T(*values):
    return torch.tensor(values, dtype=torch.float32)


def close(a, b, atol=1e-6):
    return torch.allclose(a, b if isinstance(b, torch.Tensor) else torch.tensor(b), atol=atol)


# ---- linear ------------------------------------------------------------------------------------------
def test_linear_weighted_average_and_plain_sum():
    a, b = T(1, 2), T(3, 6)
    # (1*[1,2] + 3*[3,6]) / (1+3) = [10, 20] / 4
    assert close(M.linear([a, b], [1, 3]), [2.5, 5.0])
    assert close(M.linear([a, b], [1, 3], normalize=False), [10.0, 20.0])
    assert close(M.linear(iter([a, b]), [0.5, 0.5]), [2.0, 4.0])  # any iterable, consumed once
    assert a.tolist() == [1, 2]  # inputs untouched


def test_linear_keeps_shape_and_upcasts_bf16():
    a = torch.ones(2, 3, dtype=torch.bfloat16)
    out = M.linear([a, 3 * a], [1, 1])
    assert out.shape == (2, 3) and out.dtype == torch.float32 and close(out, torch.full((2, 3), 2.0))


def test_linear_zero_weight_sum_with_normalize_raises():
    with pytest.raises(ValueError, match="sum to zero"):
        M.linear([T(1), T(2)], [1, -1])
    assert close(M.linear([T(1), T(2)], [1, -1], normalize=False), [-1.0])


# ---- slerp ----------------------------------------------------------------------------------------------
def test_slerp_endpoints_are_the_inputs():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    assert torch.equal(M.slerp(a, b, 0.0), a)
    assert torch.equal(M.slerp(a, b, 1.0), b)


def test_slerp_orthogonal_unit_vectors_follow_the_circle():
    a, b = T(1, 0), T(0, 1)
    h = math.sqrt(0.5)
    assert close(M.slerp(a, b, 0.5), [h, h])
    assert close(M.slerp(a, b, 1 / 3), [math.cos(math.pi / 6), math.sin(math.pi / 6)])
    # lerp would give [0.5, 0.5] (norm 0.71); slerp keeps the norm at 1
    assert close(torch.linalg.vector_norm(M.slerp(a, b, 0.5)), 1.0)


def test_slerp_combines_unnormalised_tensors():
    # angle from the normalised vectors (90 degrees), weights sin(θ/2)/sin θ = sqrt(1/2) on the originals
    assert close(M.slerp(T(2, 0), T(0, 4), 0.5), [2 * math.sqrt(0.5), 4 * math.sqrt(0.5)])


def test_slerp_treats_a_matrix_as_one_flat_vector():
    a = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    b = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    h = math.sqrt(0.5)
    assert close(M.slerp(a, b, 0.5), torch.tensor([[h, 0.0], [0.0, h]]))


def test_slerp_falls_back_to_lerp_when_nearly_parallel_or_antiparallel_or_zero():
    a, b = T(1, 0), T(1, 1e-3)  # cos ~ 0.9999995 > 0.9995
    assert close(M.slerp(a, b, 0.5), [1.0, 5e-4])
    assert close(M.slerp(T(1, 0), T(-1, 0), 0.25), [0.5, 0.0])  # anti-parallel: lerp
    assert close(M.slerp(T(0, 0), T(2, 2), 0.5), [1.0, 1.0])  # a zero vector has no direction
    # just below the threshold slerp proper is used (differs from lerp)
    a, b = T(1, 0), T(math.cos(0.1), math.sin(0.1))
    assert not close(M.slerp(a, b, 0.5), torch.lerp(a, b, 0.5), atol=1e-5)
    assert close(M.slerp(a, b, 0.5), [math.cos(0.05), math.sin(0.05)])


def test_gradient_interpolates_over_depth():
    assert M.interpolate_gradient(0.3, 0.9) == 0.3
    assert M.interpolate_gradient([0.0, 1.0], 0.5) == pytest.approx(0.5)
    assert M.interpolate_gradient([0.0, 0.5, 1.0], 0.25) == pytest.approx(0.25)
    assert M.interpolate_gradient([0.2, 0.8, 0.2], 0.5) == pytest.approx(0.8)
    assert M.interpolate_gradient([0.2, 0.8, 0.2], 0.75) == pytest.approx(0.5)
    assert M.interpolate_gradient([0.2, 0.8, 0.2], 1.0) == pytest.approx(0.2)
    assert M.interpolate_gradient([0.7], 0.4) == pytest.approx(0.7)


def test_layer_position_embeddings_first_norm_and_head_last():
    assert layer_position("model.layers.0.self_attn.q_proj.weight", 3) == 0.0
    assert layer_position("model.layers.1.mlp.up_proj.weight", 3) == 0.5
    assert layer_position("model.layers.2.input_layernorm.weight", 3) == 1.0
    assert layer_position("model.embed_tokens.weight", 3) == 0.0
    assert layer_position("model.norm.weight", 3) == 1.0
    assert layer_position("lm_head.weight", 3) == 1.0
    assert layer_position("transformer.h.3.attn.c_attn.weight", 4) == 1.0
    assert layer_position("model.layers.0.mlp.up_proj.weight", 1) == 0.0  # a single layer


# ---- task arithmetic ----------------------------------------------------------------------------------
def test_task_arithmetic_with_negative_weight_and_lambda():
    base, d1, d2 = T(1, 1, 1), T(1, 0, -1), T(0, 2, 2)
    # base + 2 * (1*d1 - 0.5*d2) = [1,1,1] + 2*[1,-1,-2]
    assert close(M.task_arithmetic(base, [d1, d2], [1.0, -0.5], lambda_=2.0), [3.0, -1.0, -3.0])
    # normalize divides by the weight sum 0.5
    assert close(M.task_arithmetic(base, [d1, d2], [1.0, -0.5], 2.0, normalize=True), [5.0, -3.0, -7.0])
    # a None delta is an untouched tensor
    assert close(M.task_arithmetic(base, [None, d2], [1.0, 1.0]), [1.0, 3.0, 3.0])
    assert close(M.task_arithmetic(base, [None], [1.0]), base)
    # subtracting a skill: base + d - d = base
    assert close(M.task_arithmetic(base, [d1, d1], [1.0, -1.0]), base)


# ---- trim, sign election, disjoint mean --------------------------------------------------------------
def test_magnitude_trim_keeps_top_share():
    d = T(0.1, -3.0, 2.0, -0.5)
    assert close(M.magnitude_trim(d, 0.5), [0.0, -3.0, 2.0, 0.0])
    assert close(M.magnitude_trim(d, 0.25), [0.0, -3.0, 0.0, 0.0])
    assert close(M.magnitude_trim(d, 1.0), d)
    assert close(M.magnitude_trim(d, 0.1), [0.0, 0.0, 0.0, 0.0])  # int(0.4) = 0 entries


def test_trim_keeps_mergekits_count_rounded_down():
    """mergekit's sparsify.magnitude keeps int(density * n) entries; round() would keep one more here."""
    d = T(0.5, -4.0, 1.0, 3.0, -0.2)
    assert close(M.magnitude_trim(d, 0.3), [0.0, -4.0, 0.0, 0.0, 0.0])  # 0.3 * 5 = 1.5 -> 1 entry, not 2
    assert close(M.magnitude_trim(d, 0.7), [0.0, -4.0, 1.0, 3.0, 0.0])  # 3.5 -> 3 entries, not 4
    assert M.keep_count(5, 0.5) == 2 and M.keep_count(10, 0.26) == 2
    assert M.keep_count(100, 0.29) == 28  # 0.29 * 100 is 28.999999999999996 in floats; int() gives 28, as mergekit
    # a whole TIES merge: d keeps -4 (entry 1), d2 keeps -3 (entry 2); no entry has two votes, so each
    # agreeing entry is its own mean: base + 0.5 * [0, -4, -3, 0, 0]
    base, d2 = T(1.0, 1.0, 1.0, 1.0, 1.0), T(2.0, 1.0, -3.0, 0.1, 0.3)
    assert close(M.ties(base, [d, d2], [1.0, 1.0], 0.3, lambda_=0.5), [1.0, -1.0, -0.5, 1.0, 1.0])


def test_magnitude_trim_keeps_all_entries_tied_with_the_last_kept():
    assert close(M.magnitude_trim(T(1.0, -1.0, 1.0, 0.5), 0.5), [1.0, -1.0, 1.0, 0.0])


def test_magnitude_trim_matrix():
    d = torch.tensor([[4.0, -1.0], [-2.0, 3.0]])
    assert close(M.magnitude_trim(d, 0.5), torch.tensor([[4.0, 0.0], [0.0, 3.0]]))


def test_ties_sign_election_and_disjoint_mean_by_hand():
    d1 = T(2.0, -1.0, 3.0, 0.5, 1.0)
    d2 = T(-1.0, 1.0, 2.0, -4.0, -1.0)
    merged = M.ties_delta([d1, d2], [1.0, 1.0], densities=1.0)
    # entry 0: 2 + -1 = 1 > 0, only d1 agrees -> 2
    # entry 1: -1 + 1 = 0, a sign tie -> nothing is elected, the entry stays 0
    # entry 2: both positive -> mean (3 + 2) / 2
    # entry 3: 0.5 - 4 < 0, only d2 agrees -> -4
    # entry 4: another tie -> 0
    assert close(merged, [2.0, 0.0, 2.5, -4.0, 0.0])


def test_ties_weights_enter_the_vote_and_the_mean():
    d1, d2 = T(2.0, -1.0, 1.0, 3.0), T(-1.0, 1.0, -2.0, 1.0)
    merged = M.ties_delta([d1, d2], [2.0, 1.0], densities=1.0)
    # weighted: wd1 = [4,-2,2,6], wd2 = [-1,1,-2,1]; sums [3,-1,0,7] -> signs [+,-,tie,+]
    # entry 0: d1 agrees: 4 / 2 = 2;  entry 1: d1 agrees: -2 / 2 = -1;  entry 2: tie (2 - 2) -> 0
    # entry 3: both agree: (6 + 1) / (2 + 1)
    assert close(merged, [2.0, -1.0, 0.0, 7.0 / 3.0])
    assert close(M.ties_delta([d1, d2], [2.0, 1.0], 1.0, normalize=False), [4.0, -2.0, 0.0, 7.0])


def test_ties_negative_weight_negates_a_task_vector():
    # w = -1 turns d2 = [1, 1] into [-1, -1]: entry 0 ties with d1 = 1; entry 1: 2 - 1 > 0, only d1 agrees
    merged = M.ties_delta([T(1.0, 2.0), T(1.0, 1.0)], [1.0, -1.0], densities=1.0)
    assert close(merged, [0.0, 2.0])


def test_ties_trims_before_electing():
    d1 = T(5.0, 0.1, -0.2, 4.0)  # density 0.5 keeps 5 and 4
    d2 = T(-1.0, -3.0, 2.0, 0.3)  # density 0.5 keeps -3 and 2
    merged = M.ties_delta([d1, d2], [1.0, 1.0], densities=[0.5, 0.5])
    # trimmed: [5,0,0,4] and [0,-3,2,0]: no conflicts left, each entry comes from one model
    assert close(merged, [5.0, -3.0, 2.0, 4.0])
    # without trimming, entry 0 (5 - 1 > 0) keeps only 5 and entry 1 (0.1 - 3 < 0) keeps only -3 as well,
    # but entry 2 (-0.2 + 2 > 0) keeps 2 and entry 3 averages (4 + 0.3) / 2
    assert close(M.ties_delta([d1, d2], [1.0, 1.0], 1.0), [5.0, -3.0, 2.0, 2.15])


def test_ties_adds_lambda_times_merged_to_base():
    base = T(1.0, 1.0)
    out = M.ties(base, [T(2.0, -2.0), T(4.0, 2.0)], [1.0, 1.0], densities=1.0, lambda_=0.5)
    # signs: [+, 0 (tie)] -> merged [3, 0]; base + 0.5 * merged
    assert close(out, [2.5, 1.0])
    assert close(M.ties(base, [None, None], [1.0, 1.0], 0.5), base)


# ---- DARE ---------------------------------------------------------------------------------------------
def test_dare_is_seeded_and_reproducible():
    d = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    a = M.dare_drop(d, 0.3, seed=7)
    assert torch.equal(a, M.dare_drop(d, 0.3, seed=7))
    assert not torch.equal(a, M.dare_drop(d, 0.3, seed=8))
    assert tensor_seed(0, 0, "w") == tensor_seed(0, 0, "w")
    assert len({tensor_seed(0, 0, "w"), tensor_seed(1, 0, "w"), tensor_seed(0, 1, "w"), tensor_seed(0, 0, "v")}) == 4


def test_dare_keeps_density_share_and_rescales_by_inverse_density():
    d = torch.randn(200_000, generator=torch.Generator().manual_seed(2))
    out = M.dare_drop(d, 0.3, seed=3)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.005
    assert close(out[kept], d[kept] / 0.3, atol=1e-5)


def test_dare_expectation_over_seeds_is_the_undropped_delta():
    d = torch.randn(64, generator=torch.Generator().manual_seed(4))
    density, n = 0.3, 4000
    mean = sum(M.dare_drop(d, density, seed=s) for s in range(n)) / n
    # per entry the std of the mean is |d| * sqrt((1 - p) / p) / sqrt(n) ~ 0.024 |d|: allow 5 sigma
    assert (mean - d).abs().max().item() < 0.13 * d.abs().max().item()
    # the same without rescaling is biased towards density * d
    mean_none = sum(M.dare_drop(d, density, seed=s, rescale="none") for s in range(n)) / n
    assert close(mean_none, density * d, atol=0.13 * d.abs().max().item() * density)


def test_dare_linear_expectation_is_task_arithmetic():
    g = torch.Generator().manual_seed(5)
    base, d1, d2 = torch.randn(32, generator=g), torch.randn(32, generator=g), torch.randn(32, generator=g)
    n = 3000
    # density 0.3, where rescaling by 1 / density and by 1 / (1 - density) give different expectations
    mean = sum(M.dare_linear(base, [d1, d2], [1.0, 0.5], 0.3, seeds=[s, s + n]) for s in range(n)) / n
    expected = base + d1 + 0.5 * d2
    assert (mean - expected).abs().max().item() < 0.12 * expected.abs().max().item() + 0.05


def test_dare_norm_preserving_rescale():
    d = torch.randn(5000, generator=torch.Generator().manual_seed(6))
    out = M.dare_drop(d, 0.2, seed=1, rescale="norm")
    assert torch.linalg.vector_norm(out).item() == pytest.approx(torch.linalg.vector_norm(d).item(), rel=1e-5)
    kept = out != 0
    ratio = out[kept] / d[kept]
    assert close(ratio, torch.full_like(ratio, ratio[0].item()), atol=1e-4)  # one common factor


def test_dare_rescale_none_and_density_one_and_bad_rule():
    d = T(1.0, -2.0, 3.0, 4.0)
    out = M.dare_drop(d, 0.5, seed=0, rescale="none")
    assert all(v in (0.0, x) for v, x in zip(out.tolist(), d.tolist()))
    assert torch.equal(M.dare_drop(d, 1.0, seed=0), d)
    with pytest.raises(ValueError, match="rescale"):
        M.dare_drop(d, 0.5, seed=0, rescale="l1")
    with pytest.raises(ValueError, match="density"):
        M.dare_drop(d, 0.0, seed=0)


def test_dare_ties_with_density_one_is_ties():
    d1, d2 = T(2.0, -1.0, 3.0, 0.5), T(-1.0, 1.0, 2.0, -4.0)
    base = T(0.0, 1.0, 0.0, 1.0)
    # nothing dropped; sums [1, 0, 5, -3.5]: entry 0 only d1 agrees (2), entry 1 a sign tie (0),
    # entry 2 both agree ((3 + 2) / 2), entry 3 only d2 agrees (-4); plus base
    assert close(M.dare_ties(base, [d1, d2], [1.0, 1.0], 1.0, seeds=[0, 1]), [2.0, 1.0, 2.5, -3.0])
    # with drops, the result is reproducible from the seeds
    a = M.dare_ties(base, [d1, d2], [1.0, 1.0], 0.5, seeds=[0, 1])
    assert torch.equal(a, M.dare_ties(base, [d1, d2], [1.0, 1.0], 0.5, seeds=[0, 1]))


def test_dare_methods_combine_the_dropped_deltas_as_the_papers_say():
    g = torch.Generator().manual_seed(7)
    base, d1, d2 = (torch.randn(400, generator=g) for _ in range(3))
    # the random part: which entries each seed keeps (a tensor of ones dropped without rescaling shows it)
    keep1 = M.dare_drop(torch.ones(400), 0.3, seed=0, rescale="none") != 0
    keep2 = M.dare_drop(torch.ones(400), 0.6, seed=1, rescale="none") != 0
    # the rest by hand: kept entries rescaled by 1 / density, weighted by w = [1, 0.5]
    t1, t2 = 1.0 * d1 * keep1 / 0.3, 0.5 * d2 * keep2 / 0.6
    linear = M.dare_linear(base, [d1, d2], [1.0, 0.5], [0.3, 0.6], seeds=[0, 1], lambda_=2.0)
    assert close(linear, base + 2.0 * (t1 + t2), atol=1e-5)
    # dare_ties: sign of t1 + t2 elected per entry, mean of the agreeing entries weighted by |w|
    sign = torch.sign(t1 + t2)
    a1, a2 = t1 * sign > 0, t2 * sign > 0
    agreeing = (t1 * a1 + t2 * a2) / (1.0 * a1 + 0.5 * a2).clamp(min=1e-12)
    ties = M.dare_ties(base, [d1, d2], [1.0, 0.5], [0.3, 0.6], seeds=[0, 1], lambda_=2.0)
    assert close(ties, base + 2.0 * torch.where(a1 | a2, agreeing, 0.0), atol=1e-5)
    assert (a1 & ~a2).any() and (a2 & ~a1).any() and (a1 & a2).any()  # every case occurs
