"""`tunesmith.evaluate(target)`: eval loss, perplexity and the task score by greedy generation."""
from __future__ import annotations

import math
import time

from tqdm.auto import tqdm

from ..config import RunConfig
from ..data.assemble import eval_conversations
from ..data.dataset import tokenize_all
from ..data.templates import render
from ..errors import TunesmithError
from ..data.report import ends_with_supervised_end_of_turn
from ..doctor.answers import end_of_turn_unsupervised, runaway_answers
from ..inference import answer_tokens, generate_answers, load_for_inference, stop_token_ids
from ..reporting.build import EVAL_BASE_FILE, EVAL_FILE
from ..reporting.results import record_results
from ..routing import NO_ROUTES, find_route, group_by_route, serving, task_routes
from .perplexity import supervised_nll
from .scorers import SCORERS, check_references


DOCTOR_PROBES = 4  # answers generated again as tokens, to see whether each one met a stop token


def probe_answers(loaded, convs, max_new_tokens: int, batch_size: int) -> list[dict]:
    """The first DOCTOR_PROBES answers as the doctor needs them: text, and whether generation ended on a stop
    token (the scored answers are text only, so whether they stopped or ran into max_new_tokens is lost)."""
    tokenizer = loaded.tokenizer
    prompts = [render(tokenizer, conv[:-1], add_generation_prompt=True, where=where) for conv, where in convs[:DOCTOR_PROBES]]
    rows = answer_tokens(loaded.model, tokenizer, prompts, max_new_tokens, batch_size)
    stops = set(stop_token_ids(tokenizer))
    return [{"prediction": tokenizer.decode(r, skip_special_tokens=True), "stopped": bool(r) and r[-1] in stops} for r in rows]


def score_generations(model, tokenizer, convs, scorer: str, max_new_tokens: int, batch_size: int, progress: bool = True):
    score_fn = SCORERS[scorer]
    prompts = [render(tokenizer, conv[:-1], add_generation_prompt=True, where=where) for conv, where in convs]
    references = [conv[-1]["content"] for conv, _ in convs]
    check_references(scorer, references)
    bar = tqdm(total=len(prompts), desc="generate", unit="ex", disable=not progress, dynamic_ncols=True)
    predictions = generate_answers(model, tokenizer, prompts, max_new_tokens, batch_size, on_batch=bar.update)
    bar.close()
    scores = [score_fn(p, r) for p, r in zip(predictions, references)]
    samples = [{"prediction": p, "reference": r, "score": s} for p, r, s in zip(predictions, references, scores)]
    return sum(scores) / len(scores), samples


def evaluate(target: str, base: bool = False, limit: int | None = None, progress: bool = True,
             adapter: str | None = None) -> dict:
    """Score a run folder, a trained recipe, or (with base=True) the recipe's untouched base model.

    `adapter`: serve with one task's adapters (`NAME`) or route each example by its task prefix (`auto`).
    """
    loaded = load_for_inference(target, base=base)
    config = loaded.config
    if config is None:
        raise TunesmithError(f"eval needs a run folder or a recipe (to know the eval data), got '{target}'")
    if adapter is not None:
        return evaluate_routed(loaded, config, adapter, limit, progress)
    result = evaluate_loaded(loaded, config, limit, progress)
    record_results(target, EVAL_BASE_FILE if base else EVAL_FILE, result)
    return result


def evaluate_loaded(loaded, config: RunConfig, limit: int | None = None, progress: bool = True, convs=None) -> dict:
    """Score an already loaded model on `config`'s eval data (or `convs`) with `config`'s scorer."""
    convs = eval_conversations(config) if convs is None else convs
    limit = limit or config.eval.limit
    if limit:
        convs = convs[:limit]
    start = time.perf_counter()
    examples, _ = tokenize_all(loaded.tokenizer, convs, config)
    nll = supervised_nll(loaded.model, examples, loaded.tokenizer.pad_token_id)
    score, samples = score_generations(
        loaded.model, loaded.tokenizer, convs, config.eval.scorer, config.eval.max_new_tokens, config.eval.batch_size, progress
    )
    # The doctor's Q4 check: answers that never stop, traced to the data (the same template and masking as training).
    answers = probe_answers(loaded, convs, config.eval.max_new_tokens, config.eval.batch_size)
    runaway = runaway_answers(answers, config.eval.max_new_tokens,
                              end_of_turn_unsupervised(examples, ends_with_supervised_end_of_turn))
    return {
        "model": loaded.label,
        "examples": len(convs),
        "scorer": config.eval.scorer,
        "score": round(score, 4),
        "eval_loss": round(nll["eval_loss"], 5),
        "perplexity": round(nll["perplexity"], 4),
        "eval_tokens": nll["eval_tokens"],
        "seconds": round(time.perf_counter() - start, 1),
        "samples": samples[:5],
        "doctor": [runaway.as_dict()] if runaway else [],
    }


def evaluate_routed(loaded, config: RunConfig, adapter: str, limit: int | None = None, progress: bool = True) -> dict:
    """evaluate_loaded with `--adapter NAME` (one task's adapters for every example) or `auto` (by task prefix)."""
    routes = task_routes(loaded)
    if adapter != "auto":
        route = find_route(routes, adapter)
        with serving(loaded, route):
            report = evaluate_loaded(loaded, config, limit, progress)
        return {**report, "adapter": route.name}
    if not routes:
        raise TunesmithError(NO_ROUTES)
    convs = eval_conversations(config)
    groups = group_by_route(routes, convs[: limit or config.eval.limit or len(convs)])
    parts = []
    for name, group in groups.items():
        with serving(loaded, find_route(routes, name) if name else None):
            parts.append((group, evaluate_loaded(loaded, config, None, progress, convs=group)))
    routing = {name or "(no prefix: all adapters)": len(g) for name, (g, _) in zip(groups, parts)}
    return _pooled(loaded, config, parts, adapter="auto", routing=routing)


def _pooled(loaded, config: RunConfig, parts: list[tuple[list, dict]], **routing) -> dict:
    """One report from the reports of disjoint groups: score weighted by examples, loss by supervised tokens."""
    n = sum(len(g) for g, _ in parts)
    tokens = sum(r["eval_tokens"] for _, r in parts)
    loss = sum(r["eval_loss"] * r["eval_tokens"] for _, r in parts) / tokens if tokens else float("nan")
    return {
        "model": loaded.label,
        "examples": n,
        "scorer": config.eval.scorer,
        "score": round(sum(r["score"] * len(g) for g, r in parts) / n, 4),
        "eval_loss": round(loss, 5),
        "perplexity": round(math.exp(loss), 4) if tokens else float("nan"),
        "eval_tokens": tokens,
        **routing,
        "seconds": round(sum(r["seconds"] for _, r in parts), 1),
        "samples": [s for _, r in parts for s in r["samples"]][:5],
    }
