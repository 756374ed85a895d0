"""Each preference objective's loss and gradient against TRL 1.16's own loss code on the same log-probs.

References (TRL is the reference implementation, called, not re-typed):
- dpo sigmoid and ipo: `DPOTrainer._compute_loss`, run on a trainer object without its __init__ (the method
  reads only the attributes set here) and a stand-in model whose `log_probs` are the test's per-token
  log-probs, with `precompute_ref_logps` so the reference log-probs come from the batch.
- dpo label_smoothing (cDPO): TRL 1.16's DPOTrainer no longer applies label_smoothing to its sigmoid loss, so the
  reference is the cDPO formula as TRL's experimental `CPOTrainer.cpo_loss` (loss_type="sigmoid") computes it,
  fed the two log-ratios.
- orpo: `experimental.orpo.ORPOTrainer.odds_ratio_loss`, with the trainer's combination `nll - losses.mean()`
  (get_batch_loss_metrics) and the NLL over the completion tokens in plain PyTorch.
- simpo: `experimental.cpo.CPOTrainer.cpo_loss` with loss_type="simpo" and cpo_alpha=0 (the loss is
  `losses.mean()`).
"""
from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from tunesmith.objectives import OBJECTIVES, PairLogps, get_objective
from tunesmith.objectives.dpo import dpo_loss
from tunesmith.objectives.orpo import orpo_loss
from tunesmith.objectives.simpo import simpo_loss

PAIRS, LENGTH = 3, 7


class _Accelerator:
    device = torch.device("cpu")

    def gather(self, x):
        return x

    gather_for_metrics = gather


def per_token_batch(seed: int = 0):
    """Per-token completion log-probs of [chosen x PAIRS; rejected x PAIRS] (zero off the completion), its mask."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(2 * PAIRS, LENGTH)
    for row, start in enumerate([2, 3, 1, 4, 2, 5]):
        mask[row, start:] = 1
    values = -torch.rand(2 * PAIRS, LENGTH, generator=g) * 2 * mask
    return values.requires_grad_(), mask


def trl_dpo_loss(per_token, mask, ref, beta, loss_type):
    """TRL 1.16's DPOTrainer._compute_loss on per-token log-probs (the mask includes a leading prompt column)."""
    from trl import DPOTrainer

    trainer = DPOTrainer.__new__(DPOTrainer)
    stand_in = SimpleNamespace(training=True)
    trainer.__dict__.update(
        model=stand_in, accelerator=_Accelerator(), beta=beta, loss_types=[loss_type], loss_weights=[1.0],
        ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl", use_weighting=False,
        aux_loss_enabled=False, label_smoothing=0.0, _metrics={"train": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1,
    )
    rows, length = per_token.shape
    outputs = SimpleNamespace(log_probs=per_token, entropy=torch.zeros(rows, length),
                              mean_logits=torch.zeros(rows, length), is_top1=torch.zeros(rows, length, dtype=torch.bool))
    completion_mask = torch.cat([torch.zeros(rows, 1), mask], dim=1).long()  # column 0: the prompt's first token

    def model(**kwargs):
        return outputs

    inputs = {"input_ids": torch.zeros(rows, length + 1, dtype=torch.long), "attention_mask": torch.ones(rows, length + 1),
              "completion_mask": completion_mask, "ref_chosen_logps": ref[:, 0], "ref_rejected_logps": ref[:, 1]}
    return DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)


def ours(per_token, mask, ref=None) -> PairLogps:
    sums, counts = per_token.sum(1), mask.sum(1)
    return PairLogps(sums[:PAIRS], sums[PAIRS:], counts[:PAIRS], counts[PAIRS:],
                     ref[:, 0] if ref is not None else None, ref[:, 1] if ref is not None else None)


def compare(our_fn, reference_fn, seed=0):
    """Loss and gradient w.r.t. the per-token log-probs of ours and the reference, within 1e-5."""
    per_token, mask = per_token_batch(seed)
    got = our_fn(per_token, mask)
    (grad_ours,) = torch.autograd.grad(got, per_token)
    expected = reference_fn(per_token, mask)
    (grad_ref,) = torch.autograd.grad(expected, per_token)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_ours, grad_ref, atol=1e-5, rtol=1e-5)
    assert grad_ours.abs().sum() > 0


REF = torch.tensor([[-3.0, -2.5], [-1.0, -4.0], [-2.2, -2.2]])


@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("variant", ["sigmoid", "ipo"])
def test_dpo_equals_trl_dpo_trainer(beta, variant):
    compare(lambda t, m: dpo_loss(ours(t, m, REF), beta, 0.0, variant).loss,
            lambda t, m: trl_dpo_loss(t, m, REF, beta, variant))


def test_conservative_dpo_equals_trl_cdpo_formula():
    from trl.experimental.cpo import CPOTrainer

    beta, eps = 0.3, 0.1
    cpo = SimpleNamespace(alpha=0.0, loss_type="sigmoid", beta=beta, label_smoothing=eps, accelerator=_Accelerator())

    def reference(t, m):
        logps = ours(t, m, REF)
        return CPOTrainer.cpo_loss(cpo, logps.chosen - logps.ref_chosen, logps.rejected - logps.ref_rejected)[0].mean()

    compare(lambda t, m: dpo_loss(ours(t, m, REF), beta, eps).loss, reference)


def test_dpo_rewards_are_beta_times_log_ratios():
    per_token, mask = per_token_batch()
    out = dpo_loss(ours(per_token, mask, REF), 0.2)
    sums = per_token.detach().sum(1)
    torch.testing.assert_close(out.chosen_rewards, 0.2 * (sums[:PAIRS] - REF[:, 0]))
    torch.testing.assert_close(out.rejected_rewards, 0.2 * (sums[PAIRS:] - REF[:, 1]))


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_orpo_equals_trl_odds_ratio_loss(beta):
    from trl.experimental.orpo import ORPOTrainer

    orpo = SimpleNamespace(beta=beta, accelerator=_Accelerator())

    def reference(t, m):
        means = t.sum(1) / m.sum(1)
        nll = -(t[:PAIRS].sum() / m[:PAIRS].sum())  # token mean over the chosen replies, as nn.CrossEntropyLoss
        losses = ORPOTrainer.odds_ratio_loss(orpo, means[:PAIRS], means[PAIRS:])[0]
        return nll - losses.mean()

    compare(lambda t, m: orpo_loss(ours(t, m), beta).loss, reference)


@pytest.mark.parametrize(("beta", "gamma"), [(2.0, 0.5), (2.5, 1.4)])
def test_simpo_equals_trl_cpo_simpo(beta, gamma):
    from trl.experimental.cpo import CPOTrainer

    cpo = SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=gamma, beta=beta, label_smoothing=0.0,
                          accelerator=_Accelerator())

    def reference(t, m):
        means = t.sum(1) / m.sum(1)
        return CPOTrainer.cpo_loss(cpo, means[:PAIRS], means[PAIRS:])[0].mean()

    compare(lambda t, m: simpo_loss(ours(t, m), beta, gamma).loss, reference)


def test_registry_entries():
    assert list(OBJECTIVES) == ["sft", "dpo", "orpo", "simpo"]
    assert [n for n, e in OBJECTIVES.items() if e.needs_reference] == ["dpo"]
    assert [n for n, e in OBJECTIVES.items() if e.preference] == ["dpo", "orpo", "simpo"]
    with pytest.raises(ValueError, match="unknown objective 'kto'"):
        get_objective("kto")
