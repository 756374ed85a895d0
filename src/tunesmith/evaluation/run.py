"""`tunesmith.evaluate(target)`: eval loss, perplexity and the task score by greedy generation."""
from __future__ import annotations

import time

from tqdm.auto import tqdm

from ..config import RunConfig
from ..data.dataset import load_conversations, split_conversations, tokenize_all
from ..data.templates import render
from ..errors import TunesmithError
from ..inference import generate_batch, load_for_inference
from .perplexity import supervised_nll
from .scorers import SCORERS, check_references


def eval_conversations(config: RunConfig):
    """The held-out conversations: data.eval, or the same held-out split training used."""
    if config.data.task_prefix:  # the same prefixes, and the same split, as training (continual.py)
        from ..continual import load_task_conversations

        which = "eval" if config.data.eval else "train"
        convs = [(c, w) for c, w, _ in load_task_conversations(config, which)]
        if which == "eval":
            return convs
        _, held = split_conversations(convs, config.data.eval_split, config.train.seed)
        if not held:
            raise TunesmithError("no eval data: set data.eval, or a data.eval_split > 0 with more than one training row")
        return held
    if config.data.eval:
        return load_conversations(config.data.eval, config)
    train = load_conversations(config.data.train, config)
    _, held = split_conversations(train, config.data.eval_split, config.train.seed)
    if not held:
        raise TunesmithError("no eval data: set data.eval, or a data.eval_split > 0 with more than one training row")
    return held


def score_generations(model, tokenizer, convs, scorer: str, max_new_tokens: int, batch_size: int, progress: bool = True):
    score_fn = SCORERS[scorer]
    prompts = [render(tokenizer, conv[:-1], add_generation_prompt=True, where=where) for conv, where in convs]
    references = [conv[-1]["content"] for conv, _ in convs]
    check_references(scorer, references)
    predictions: list[str] = []
    bar = tqdm(total=len(prompts), desc="generate", unit="ex", disable=not progress, dynamic_ncols=True)
    for i in range(0, len(prompts), batch_size):
        predictions.extend(generate_batch(model, tokenizer, prompts[i : i + batch_size], max_new_tokens))
        bar.update(len(prompts[i : i + batch_size]))
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
        from ..continual import evaluate_routed

        return evaluate_routed(loaded, config, adapter, limit, progress)
    return evaluate_loaded(loaded, config, limit, progress)


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
    }
