"""The doctor's detectors: pure functions over metrics rows (the dicts of metrics.jsonl), each returning a
Finding in the guide's terms (§8.4 troubleshooting, Q4) or None. They run during training on the rows logged so
far (doctor/callback.py) and afterwards on a run folder's metrics.jsonl (`tunesmith doctor RUN`)."""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from .findings import Finding

# The guide's learning-rate range for LoRA-family adapters (§8.3); full fine-tuning wants about 1e-5.
ADAPTER_LR = (1e-4, 5e-4)
FULL_LR = (5e-6, 5e-5)


@dataclass(frozen=True)
class RunFacts:
    """What a detector needs to know about the run besides its metrics."""

    lr: float
    adapter: bool = True
    max_grad_norm: float = 1.0
    vocab_size: int | None = None  # a loss above 2 ln(V) is worse than guessing uniformly: training diverged
    warmup_share: float = 0.3  # loss may stay flat this share of the logged steps before it must fall


def train_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if "loss" in r]


def eval_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if "eval_loss" in r]


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def lr_text(lr: float) -> str:
    """A learning rate as the guide writes it: 1e-4, 5e-4, 2e-05 -> 2e-5."""
    return f"{lr:.0e}".replace("e-0", "e-").replace("e+00", "") if lr < 1 else f"{lr:g}"


def lr_range(facts: RunFacts) -> str:
    lo, hi = ADAPTER_LR if facts.adapter else FULL_LR
    return f"{lr_text(lo)}..{lr_text(hi)}"


def lr_advice(facts: RunFacts) -> str:
    lo, hi = ADAPTER_LR if facts.adapter else FULL_LR
    kind = "LoRA-family adapters" if facts.adapter else "full fine-tuning"
    where = "above" if facts.lr > hi else "below" if facts.lr < lo else "inside"
    return f"train.lr={facts.lr:g} is {where} the guide's {lr_range(facts)} range for {kind}"


def non_finite_loss(rows: list[dict], facts: RunFacts) -> Finding | None:
    """The first logged loss (or grad norm) that is NaN or Inf: fatal, the weights after it are garbage."""
    for r in train_rows(rows):
        bad = [k for k in ("loss", "grad_norm") if k in r and not _finite(r[k])]
        if bad:
            lo, hi = ADAPTER_LR if facts.adapter else FULL_LR
            cause = (f"the learning rate: {lr_advice(facts)}" if facts.lr > hi else
                     "an fp16 overflow or a bad data row (look at the examples of this step with `tunesmith data inspect`)")
            return Finding(
                code="loss_not_finite", fatal=True, step=r["step"],
                message=f"{' and '.join(bad)} became {r[bad[0]]} at step {r['step']}",
                cause=cause,
                remedy=f"lower train.lr into {lr_range(facts)} (e.g. {lr_text(lo * 2)}), keep train.max_grad_norm: 1.0 and use bf16 "
                       "rather than fp16; resume from the last good checkpoint with --resume --force",
            )
    return None


def loss_diverged(rows: list[dict], facts: RunFacts) -> Finding | None:
    """A finite loss above twice ln(vocab size): the model predicts worse than a uniform guess over the vocabulary
    (which is ln V, where a fresh model starts), so the weights were wrecked by the steps before. Fatal like NaN."""
    if not facts.vocab_size:
        return None
    limit = 2 * math.log(facts.vocab_size)
    for r in train_rows(rows):
        if _finite(r["loss"]) and r["loss"] > limit:
            return Finding(
                code="loss_diverged", fatal=True, step=r["step"],
                message=f"loss diverged to {r['loss']:.4g} at step {r['step']}, above 2 ln(vocabulary size) = {limit:.3g} "
                        "(a uniform guess scores ln V)",
                cause=f"the learning rate: {lr_advice(facts)}",
                remedy=f"lower train.lr into {lr_range(facts)} and keep train.max_grad_norm: 1.0; resume from the last good "
                       "checkpoint with --resume --force",
            )
    return None


def loss_not_falling(rows: list[dict], facts: RunFacts, supervised_per_step: float | None = None) -> Finding | None:
    """Train loss no lower after the warm-up share of the logged steps than at the start (less than 2% down)."""
    losses = [(r["step"], r["loss"]) for r in train_rows(rows) if _finite(r.get("loss"))]
    if len(losses) < 6:
        return None
    k = max(2, len(losses) // 5)
    start = statistics.fmean(v for _, v in losses[:k])
    after = [v for s, v in losses[int(len(losses) * facts.warmup_share):]][-k:]
    end = statistics.fmean(after)
    if end < start * 0.98:
        return None
    if supervised_per_step == 0:
        cause = "no token carries loss: every label is masked, so there is nothing to learn"
        remedy = ("check which tokens carry loss with `tunesmith data inspect RECIPE` (data.train_on, the chat template's "
                  "assistant turns); `tunesmith data check` must pass")
    else:
        tokens = "" if supervised_per_step is None else f"; the steps had {supervised_per_step:.0f} supervised tokens each on average"
        cause = f"{lr_advice(facts)}{tokens}"
        remedy = (f"set train.lr inside {lr_range(facts)} (for LoRA the guide starts at 2e-4); if the lr is already there, check "
                  "the labels with `tunesmith data inspect RECIPE` (too few supervised tokens teach little)")
    return Finding(
        code="loss_not_falling", step=losses[-1][0],
        message=f"train loss is not falling: {start:.4f} over the first {k} logged steps, {end:.4f} over the last {len(after)}",
        cause=cause, remedy=remedy,
    )


def grad_norm_explosion(rows: list[dict], facts: RunFacts, factor: float = 10.0) -> Finding | None:
    """A grad norm `factor` times the median of the ones logged before it, and above the clip norm."""
    norms = [(r["step"], r["grad_norm"]) for r in train_rows(rows) if _finite(r.get("grad_norm"))]
    for i in range(1, len(norms)):
        step, g = norms[i]
        before = statistics.median(v for _, v in norms[:i])
        if before > 0 and g > factor * before and g > facts.max_grad_norm:
            return Finding(
                code="grad_norm_explosion", step=step,
                message=f"grad norm jumped to {g:.3g} at step {step}, {g / before:.0f}x the median {before:.3g} of the steps before",
                cause=lr_advice(facts),
                remedy="lower train.lr, keep gradient clipping on (train.max_grad_norm: 1.0) and warm up longer "
                       "(train.warmup: 0.1); if it comes back, look for an unusual example in those steps",
            )
    return None


def overfitting(rows: list[dict], facts: RunFacts, rise: float = 0.01) -> Finding | None:
    """Eval loss rising while train loss falls: the two last evaluations above the lowest one by more than `rise`
    (relative), and the train loss logged after the lowest evaluation lower than before it."""
    evals = [(r["step"], r["eval_loss"]) for r in eval_rows(rows) if _finite(r.get("eval_loss"))]
    if len(evals) < 3:
        return None
    best_i = min(range(len(evals)), key=lambda i: evals[i][1])
    best_step, best = evals[best_i]
    after = evals[best_i + 1:]
    if len(after) < 2 or not all(v > best * (1 + rise) for _, v in after[-2:]):
        return None
    train = [(r["step"], r["loss"]) for r in train_rows(rows) if _finite(r.get("loss"))]
    before_t = [v for s, v in train if s <= best_step]
    after_t = [v for s, v in train if s > best_step]
    if not before_t or not after_t or statistics.fmean(after_t) >= statistics.fmean(before_t):
        return None
    return Finding(
        code="overfitting", step=best_step,
        message=f"overfitting began at step {best_step}: eval loss rose from {best:.4f} to {after[-1][1]:.4f} at step "
                f"{after[-1][0]} while train loss kept falling",
        cause="the model is memorising the training examples instead of learning the task (few examples, many epochs)",
        remedy="more dropout (method.dropout: 0.1), lower r (method.r: 8), NEFTune (train.neftune_alpha: 5), fewer epochs "
               f"(stop near step {best_step}), or more data; train.keep_best: eval_loss keeps the best checkpoint",
    )


def training_findings(rows: list[dict], facts: RunFacts, supervised_per_step: float | None = None) -> list[Finding]:
    """Every training-curve detector over `rows`; a non-finite loss makes the others meaningless."""
    fatal = non_finite_loss(rows, facts) or loss_diverged(rows, facts)
    if fatal is not None:
        return [fatal]
    found = [loss_not_falling(rows, facts, supervised_per_step), grad_norm_explosion(rows, facts), overfitting(rows, facts)]
    return [f for f in found if f is not None]
