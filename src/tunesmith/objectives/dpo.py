"""Direct Preference Optimization (Rafailov et al. 2023), with conservative DPO's label smoothing and IPO.

The implicit reward of a reply is beta * (log pi(y|x) - log pi_ref(y|x)), with log-probs summed over the
completion tokens. Conventions are TRL 1.16's DPOTrainer (tests/test_objectives.py compares against it):
- sigmoid: -log sigmoid(beta * delta), delta = chosen log-ratio - rejected log-ratio.
- label_smoothing eps > 0 (cDPO, Mitchell 2023): -(1 - eps) log sigmoid(beta delta) - eps log sigmoid(-beta delta);
  TRL 1.16 no longer applies label_smoothing to its sigmoid loss, so the test's reference is that formula
  (which TRL's own CPO trainer and earlier DPOTrainer releases compute).
- ipo (Azar et al. 2023, eq. 17): (delta_avg - 1 / (2 beta))^2 with each log-ratio divided by its reply's
  token count, as TRL does.
The loss is the mean over the pairs of the micro batch.
"""
from __future__ import annotations

from .objective import Objective, ObjectiveOutput, PairLogps


def dpo_loss(logps: PairLogps, beta: float, label_smoothing: float = 0.0, variant: str = "sigmoid") -> ObjectiveOutput:
    import torch.nn.functional as F  # heavy: config.py reads this module's entry without torch

    chosen_ratio = logps.chosen - logps.ref_chosen
    rejected_ratio = logps.rejected - logps.ref_rejected
    if variant == "ipo":
        delta = chosen_ratio / logps.chosen_tokens.clamp(min=1) - rejected_ratio / logps.rejected_tokens.clamp(min=1)
        per_pair = (delta - 1 / (2 * beta)) ** 2
    else:
        delta = chosen_ratio - rejected_ratio
        per_pair = -F.logsigmoid(beta * delta) * (1 - label_smoothing) - F.logsigmoid(-beta * delta) * label_smoothing
    return ObjectiveOutput(
        loss=per_pair.mean(),
        chosen_rewards=beta * chosen_ratio.detach(),
        rejected_rewards=beta * rejected_ratio.detach(),
        chosen_logps=logps.chosen.detach(),
        rejected_logps=logps.rejected.detach(),
    )


def _loss(logps: PairLogps, options) -> ObjectiveOutput:
    return dpo_loss(logps, options.beta, options.label_smoothing, options.loss)


OBJECTIVE = Objective(
    name="dpo",
    when="Teach which of two answers to prefer, staying close to the model you start from (a reference).",
    preference=True,
    needs_reference=True,
    default_beta=0.1,
    options=frozenset({"label_smoothing", "loss"}),
    loss=_loss,
)
