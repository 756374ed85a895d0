"""What fine-tuning cost: general perplexity before and after, and the accuracy matrix of a task sequence.

General ability is measured as perplexity on the held-out topics of the general corpus (data/general.py:
the Python reference; replay and EWC train only on its other topics, so never on the measured text).
Beside it, the base model's own answers to everyday questions (general_questions.py): how much less the
fine-tuned model expects them, and how many it still gives word for word.

For a task sequence (run 1, then run 2 trained after it, ...), R[i][j] is the score on task j of the
model after training task i. Average accuracy = mean_j R[n-1][j]; backward transfer
BWT = mean_{j < n-1} (R[n-1][j] - R[j][j]) (Lopez-Paz & Ranzato 2017): negative means forgetting.
"""
from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import torch

from ..data.general import DEFAULT_BLOCK_TOKENS, GENERAL_CORPUS, general_blocks
from ..errors import TunesmithError
from ..inference import load_for_inference, resolve_target
from ..methods import get_method
from ..methods.adapter_stack import previous_chain
from ..reporting.build import FORGETTING_FILE
from ..reporting.results import record_results
from ..routing import adapters_for_task
from ..rundir import is_run_dir, load_run_config
from .general_questions import QUESTIONS, answer_perplexity, answer_questions, base_answers, same_answer_share
from .run import evaluate_loaded, evaluate_routed


@torch.inference_mode()
def general_perplexity(model, blocks: list[list[int]], batch_size: int = 4) -> dict:
    """Token-weighted mean next-token NLL (fp32) over every position of every block, and its exp."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        batch = blocks[i : i + batch_size]
        ids = torch.tensor(batch, dtype=torch.long, device=device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        targets = ids[:, 1:]
        total += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum"
        ).item()
        count += targets.numel()
    nll = total / count if count else float("nan")
    return {"nll": nll, "perplexity": math.exp(nll) if count else float("nan"), "tokens": count}


def relative_change(before: float, after: float) -> float:
    return (after - before) / before


def _adapters_on_original_base(loaded) -> bool:
    """True when switching the adapters off gives the untouched base (every adapter run, continual ones too:
    they load with their earlier adapters beside the new one, never merged)."""
    return callable(getattr(loaded.model, "disable_adapter", None))


@contextlib.contextmanager
def base_model(loaded, target: str):
    """The untouched base, as (model, cache label): adapters switched off in place, or the base loaded alone."""
    config = loaded.config
    ref = Path(config.model)
    label = str(ref.resolve()) if ref.exists() else config.model
    if _adapters_on_original_base(loaded):
        with loaded.model.disable_adapter():
            # a 4-bit base answers differently from the full-precision one: its own cache entry
            quantized = get_method(config.method.name).quantized_base
            yield loaded.model, label + (f" ({config.method.quant_type})" if quantized else "")
        return

    base = load_for_inference(target, base=True)
    try:
        yield base.model, label
    finally:
        del base


def sequence_metrics(R: list[list[float]]) -> dict:
    """Average accuracy and backward transfer from the accuracy matrix (rows: after task i; cols: task j)."""
    n = len(R)
    last = R[-1]
    acc = sum(last) / n
    bwt = sum(last[j] - R[j][j] for j in range(n - 1)) / (n - 1) if n > 1 else 0.0
    return {"average_accuracy": round(acc, 4), "bwt": round(bwt, 4)}


def task_sequence(target: str, previous: list[str] | None = None) -> list[str]:
    """The runs of a task sequence, oldest first: `previous` if given, else the run's continual.previous chain."""
    if previous:
        return [*previous, target]
    config = load_run_config(target)
    if config.continual.previous:
        return [*previous_chain(config), target]
    return [target]


def accuracy_matrix(runs: list[str], limit: int | None = None, route: bool = False, progress: bool = False) -> dict:
    """R[i][j]: the score on task j (run j's eval data and scorer) of the model trained through task i."""
    for r in runs:
        if not is_run_dir(r):
            raise TunesmithError(f"task sequence: '{r}' is not a trained run folder; train it first")
    configs = [load_run_config(r) for r in runs]
    R: list[list[float]] = []
    for i, run in enumerate(runs):
        loaded = load_for_inference(run)
        row = []
        for j, cfg in enumerate(configs):
            with _routed(loaded, runs[j], route):
                row.append(evaluate_loaded(loaded, cfg, limit, progress)["score"])
        R.append(row)
        del loaded
    return {"runs": [str(r) for r in runs], "R": R, **sequence_metrics(R)}


def _routed(loaded, task_run: str, route: bool):
    """With routing, evaluate task j through the adapters its own run was trained with (when this model has them)."""
    if not route:
        return contextlib.nullcontext()
    return adapters_for_task(loaded, task_run)


def forgetting_report(
    target: str,
    previous: list[str] | None = None,
    limit: int | None = None,
    general_tokens: int | None = None,
    adapter: str | None = None,
    progress: bool = True,
) -> dict:
    """Task score next to general perplexity, base vs fine-tuned; R, average accuracy and BWT for a sequence.

    `adapter` NAME or auto serves the task score like `eval --adapter`; with auto, R[i][j] serves task j with the
    adapters task j was trained with, where run i has them (per-task adapters: no interference between tasks).
    """
    start = time.perf_counter()
    loaded = load_for_inference(target)
    config = loaded.config
    if config is None:
        raise TunesmithError(f"eval --forgetting needs a run folder or a trained recipe, got '{target}'")
    budget = general_tokens or config.eval.general_tokens
    blocks = general_blocks(loaded.tokenizer, "heldout", min(DEFAULT_BLOCK_TOKENS, budget), budget)
    tuned = general_perplexity(loaded.model, blocks)
    with base_model(loaded, target) as (base_lm, base_label):
        base = general_perplexity(base_lm, blocks)
        reference = base_answers(base_lm, loaded.tokenizer, base_label)
        base_answer_ppl = answer_perplexity(base_lm, loaded.tokenizer, QUESTIONS, reference)
    answer_ppl = answer_perplexity(loaded.model, loaded.tokenizer, QUESTIONS, reference)
    same = same_answer_share(answer_questions(loaded.model, loaded.tokenizer), reference)
    if adapter is not None:
        task = evaluate_routed(loaded, config, adapter, limit, progress)
    else:
        task = evaluate_loaded(loaded, config, limit, progress)
    report = {
        "model": loaded.label,
        "task": {k: task[k] for k in ("examples", "scorer", "score", "eval_loss", "perplexity")},
        "general": {
            "corpus": GENERAL_CORPUS + ", held-out topics",
            "tokens": tuned["tokens"],
            "base_perplexity": round(base["perplexity"], 4),
            "perplexity": round(tuned["perplexity"], 4),
            "relative_change": round(relative_change(base["perplexity"], tuned["perplexity"]), 4),
        },
        "general_questions": {
            "questions": len(QUESTIONS),
            "base_answer_perplexity": round(base_answer_ppl["perplexity"], 4),
            "answer_perplexity": round(answer_ppl["perplexity"], 4),
            "relative_change": round(relative_change(base_answer_ppl["perplexity"], answer_ppl["perplexity"]), 4),
            "same_answers": round(same, 4),
        },
    }
    run_dir = _run_dir_of(target)
    runs = task_sequence(run_dir, previous) if run_dir else [target]
    if len(runs) > 1:
        del loaded
        report["sequence"] = accuracy_matrix(runs, limit, route=adapter == "auto", progress=False)
    report["seconds"] = round(time.perf_counter() - start, 1)
    record_results(target, FORGETTING_FILE, report)
    return report


def _run_dir_of(target: str) -> str | None:
    _, run = resolve_target(target)
    return str(run) if run is not None else None
