"""What fine-tuning cost: general perplexity before and after, and the accuracy matrix of a task sequence.

General ability is measured as perplexity on held-out general English: the Python reference that ships
with every Python install (`pydoc_data.topics.topics`, about 465k characters in 79 topics). The topics
are split once, by name: every fifth topic (sorted) is held out for measuring, the rest is what
`regularize.replay` and `regularize.ewc` may train on, so replay never trains on the measured text.
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
from typing import Literal

import torch

from ..errors import TunesmithError
from .general_questions import QUESTIONS, answer_perplexity, answer_questions, base_answers, same_answer_share

GENERAL_CORPUS = "pydoc_data.topics (Python reference)"
HELDOUT_EVERY, HELDOUT_OFFSET = 5, 2
DEFAULT_BLOCK_TOKENS = 256


def general_topics(split: Literal["train", "heldout"]) -> list[str]:
    """Topic names of the general corpus in one split (deterministic: by sorted name)."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    held = {n for i, n in enumerate(names) if i % HELDOUT_EVERY == HELDOUT_OFFSET}
    if split == "heldout":
        return [n for n in names if n in held]
    if split == "train":
        return [n for n in names if n not in held]
    raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")


def general_text(split: Literal["train", "heldout"]) -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[n].strip() for n in general_topics(split))


def general_token_ids(tokenizer, split: Literal["train", "heldout"]) -> list[int]:
    return list(tokenizer(general_text(split), add_special_tokens=False, verbose=False)["input_ids"])


def general_blocks(
    tokenizer, split: Literal["train", "heldout"] = "heldout", block_tokens: int = DEFAULT_BLOCK_TOKENS,
    max_tokens: int | None = None,
) -> list[list[int]]:
    """Contiguous blocks of `block_tokens` tokens; with `max_tokens`, evenly spaced blocks up to that budget."""
    ids = general_token_ids(tokenizer, split)
    blocks = [ids[i : i + block_tokens] for i in range(0, len(ids) - block_tokens + 1, block_tokens)]
    if max_tokens is not None:
        want = max(1, min(len(blocks), max_tokens // block_tokens))
        blocks = [blocks[(k * len(blocks)) // want] for k in range(want)]
    return blocks


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
            yield loaded.model, label + (" (nf4)" if config.method.name == "qlora" else "")
        return
    from ..inference import load_for_inference

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
    from ..rundir import load_run_config

    if previous:
        return [*previous, target]
    config = load_run_config(target)
    if config.continual.previous:
        from ..continual import previous_chain

        return [*previous_chain(config), target]
    return [target]


def accuracy_matrix(runs: list[str], limit: int | None = None, route: bool = False, progress: bool = False) -> dict:
    """R[i][j]: the score on task j (run j's eval data and scorer) of the model trained through task i."""
    from ..inference import load_for_inference
    from ..rundir import is_run_dir, load_run_config
    from .run import evaluate_loaded

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
    from ..continual import adapters_for_task

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
    from ..inference import load_for_inference
    from .run import evaluate_loaded

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
        from ..continual import evaluate_routed

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
    return report


def _run_dir_of(target: str) -> str | None:
    from ..inference import resolve_target

    _, run = resolve_target(target)
    return str(run) if run is not None else None
