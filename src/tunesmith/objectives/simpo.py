"""SimPO (Meng et al. 2024): length-normalised log-probs as the reward, a target margin gamma, no reference.

    loss = -log sigmoid(beta * (mean log p(chosen) - mean log p(rejected)) - gamma)

as TRL 1.16's experimental CPOTrainer with loss_type="simpo" and cpo_alpha=0 computes it (`cpo_loss`, with
its label_smoothing at 0: TRL's logits minus gamma / beta, times beta). Means are over completion tokens.
"""
from __future__ import annotations

from .objective import Objective, ObjectiveOutput, PairLogps


def simpo_loss(logps: PairLogps, beta: float, gamma: float) -> ObjectiveOutput:
    import torch.nn.functional as F  # heavy: config.py reads this module's entry without torch

    chosen = logps.chosen / logps.chosen_tokens.clamp(min=1)
    rejected = logps.rejected / logps.rejected_tokens.clamp(min=1)
    per_pair = -F.logsigmoid(beta * (chosen - rejected) - gamma)
    return ObjectiveOutput(
        loss=per_pair.mean(),
        chosen_rewards=beta * chosen.detach(),
        rejected_rewards=beta * rejected.detach(),
        chosen_logps=chosen.detach(),
        rejected_logps=rejected.detach(),
    )


OBJECTIVE = Objective(
    name="simpo",
    when="Preference without a reference model, rewards normalised by length (does not favour long replies).",
    preference=True,
    default_beta=2.0,
    options=frozenset({"gamma"}),
    loss=lambda logps, options: simpo_loss(logps, options.beta, options.gamma),
)
