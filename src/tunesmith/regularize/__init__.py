"""Mitigations against forgetting, configured under `regularize` in a recipe.

- replay:     general (or other) data mixed into the training examples at an exact ratio; that is data, so
              data/mixing.py builds it and only its summary is reported here.
- distill.py: KL to the frozen base model's next-token distribution (alpha * SFT + (1 - alpha) * KD).
- ewc.py:     elastic weight consolidation with a diagonal Fisher from per-example squared gradients.

Each loss-side mitigation is a `loss_terms` callable `term(model, inputs, hidden) -> scalar` for the
MethodTrainer; `build_loss_terms` collects the ones a config asks for.
"""
from __future__ import annotations

from ..methods.adapter_stack import previous_adapters
from .distill import DistillTerm
from .ewc import ewc_term_for_run
from .orthogonality import OrthogonalityTerm


def build_loss_terms(config, model, tokenizer, data, out_dir, resume: bool = False) -> tuple[list, dict]:
    """The loss terms `config.regularize` (and continual o-lora) asks for, and a summary of each for summary.json."""
    terms, info = [], {}
    r = config.regularize
    if r.distill is not None:
        teacher = None
        if config.continual.previous and config.continual.strategy in ("progressive", "o-lora"):
            teacher = [e.name for e in previous_adapters(config)]  # the model as the previous task left it
        terms.append(DistillTerm(model, r.distill.alpha, r.distill.temperature, teacher_adapters=teacher))
        info["distill"] = {"alpha": r.distill.alpha, "temperature": r.distill.temperature}
        if teacher:
            info["distill"]["teacher_adapters"] = teacher
    if r.ewc is not None:
        term = ewc_term_for_run(config, model, tokenizer, out_dir, resume)
        terms.append(term)
        info["ewc"] = term.describe()
    if config.continual.previous and config.continual.strategy == "o-lora":
        terms.append(OrthogonalityTerm(model, config.continual.orthogonal_lambda))
        info["o-lora"] = {"orthogonal_lambda": config.continual.orthogonal_lambda}
    if r.replay is not None and getattr(data, "mix", None):
        info["replay"] = data.mix.get("replay")
    return terms, info
