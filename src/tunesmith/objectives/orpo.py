"""ORPO (Hong et al. 2024): the SFT loss on the chosen reply plus an odds-ratio preference term, no reference.

    loss = NLL(chosen) - lambda * mean log sigmoid(log odds(chosen) - log odds(rejected))

with odds(y) = P / (1 - P) and log P the reply's per-token mean log-prob, as in TRL 1.16's experimental
ORPOTrainer (`odds_ratio_loss`; its `beta` is the paper's lambda). NLL is the mean over the chosen replies'
completion tokens: tunesmith's SFT masking. TRL's ORPOTrainer puts the prompt tokens in its NLL too; the
test gives both the same NLL to compare the rest, and names that difference.
"""
from __future__ import annotations

from .objective import Objective, ObjectiveOutput, PairLogps


def log1mexp(x):
    """log(1 - exp(x)) for x < 0, without cancellation (Maechler 2012: branch at -log 2)."""
    import torch  # heavy: config.py reads this module's entry without torch

    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(logps: PairLogps, beta: float) -> ObjectiveOutput:
    import torch.nn.functional as F  # heavy: config.py reads this module's entry without torch

    chosen = logps.chosen / logps.chosen_tokens.clamp(min=1)
    rejected = logps.rejected / logps.rejected_tokens.clamp(min=1)
    nll = -logps.chosen.sum() / logps.chosen_tokens.sum().clamp(min=1)
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    ratio = F.logsigmoid(log_odds)
    return ObjectiveOutput(
        loss=nll - beta * ratio.mean(),
        chosen_rewards=beta * chosen.detach(),
        rejected_rewards=beta * rejected.detach(),
        chosen_logps=chosen.detach(),
        rejected_logps=rejected.detach(),
        extra={"nll_loss": nll.detach(), "log_odds_ratio": ratio.detach().mean(), "log_odds_chosen": log_odds.detach().mean()},
    )


OBJECTIVE = Objective(
    name="orpo",
    when="SFT and preference in one step, no reference model: less memory than DPO, starts from the base.",
    preference=True,
    default_beta=0.1,
    metrics=("nll_loss", "log_odds_ratio", "log_odds_chosen"),
    loss=lambda logps, options: orpo_loss(logps, options.beta),
)
