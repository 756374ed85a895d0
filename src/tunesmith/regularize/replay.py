"""Weighted mixing of datasets and replay of general data, at exact shares.

Weighted mixing (`data.weights`, or `{path, weight}` entries in `data.train`): an epoch has as many
examples as the datasets together; dataset i contributes round(N * w_i / sum w) of them (largest
remainder, so the counts add up to N). A smaller dataset is repeated (whole reshuffled passes), a
larger one subsampled.

Replay (`regularize.replay`): r = round(ratio * N / (1 - ratio)) examples from the replay source are
added, so replay is `ratio` of the training examples. `general` replay examples are chunks of the
train part of the general corpus (evaluate/forgetting.py; never the held-out topics that
`eval --forgetting` measures), every token supervised, each as long as the task examples' median
supervised tokens so the ratio of examples is also the ratio of the loss.

Exact, not random: every stream is spread evenly through the epoch (item k of a stream of n sits at
(k + 0.5) / n), and training reads the order as given, so any window of m consecutive examples holds
within one of m * share from each stream, whatever the step budget.
"""
from __future__ import annotations

import random
import statistics
from dataclasses import dataclass, field

from ..config import RunConfig
from ..data.dataset import PreparedData, SplitStats, split_conversations, tokenize_all
from ..data.masking import IGNORE_INDEX, TokenizedExample
from ..data.templates import apply_template_override
from ..errors import TunesmithError

GENERAL = "general"


@dataclass
class MixedData(PreparedData):
    """Prepared data whose train order must be kept (sequential sampling), with the mix it came from."""

    mix: dict = field(default_factory=dict)
    ordered: bool = True


def needs_mixing(config: RunConfig) -> bool:
    d = config.data
    return d.weights is not None or config.regularize.replay is not None or bool(d.task_prefix)


def largest_remainder(total: int, weights: list[float]) -> list[int]:
    """Whole counts proportional to weights that add up to `total` exactly (each at least 1)."""
    wsum = float(sum(weights))
    quotas = [total * w / wsum for w in weights]
    counts = [max(1, int(q)) for q in quotas]
    order = sorted(range(len(weights)), key=lambda i: quotas[i] - int(quotas[i]), reverse=True)
    k = 0
    while sum(counts) < total:
        counts[order[k % len(order)]] += 1
        k += 1
    return counts


def take(items: list, count: int, rng: random.Random) -> list:
    """`count` items: whole reshuffled passes over `items`, the last one cut short."""
    out: list = []
    while len(out) < count:
        perm = list(items)
        rng.shuffle(perm)
        out.extend(perm[: count - len(out)])
    return out


def interleave(streams: list[list]) -> list:
    """All streams in one list, each spread evenly: item k of a stream of n at position (k + 0.5) / n."""
    keyed = [((k + 0.5) / len(s), i, k) for i, s in enumerate(streams) for k in range(len(s))]
    keyed.sort()
    return [streams[i][k] for _, i, k in keyed]


def general_chunks(tokenizer, chunk_tokens: int) -> list[TokenizedExample]:
    """Consecutive chunks of the general corpus's train part, every token supervised."""
    from ..evaluation.forgetting import general_token_ids

    ids = general_token_ids(tokenizer, "train")
    chunks = []
    for start in range(0, len(ids) - chunk_tokens + 1, chunk_tokens):
        piece = ids[start : start + chunk_tokens]
        chunks.append(TokenizedExample(piece, list(piece), ["general"] * len(piece), f"general[{start}:{start + chunk_tokens}]"))
    return chunks


def source_examples(source, tokenizer, config: RunConfig, chunk_tokens: int) -> list[TokenizedExample]:
    """Examples of a replay/reference source: `general` chunks, or data files in any supported format."""
    if source == GENERAL:
        return general_chunks(tokenizer, chunk_tokens)
    from ..data.dataset import load_conversations

    auto = config.model_copy(update={"data": config.data.model_copy(update={"format": "auto", "system_prompt": None})})
    examples, _ = tokenize_all(tokenizer, load_conversations(source, auto), auto)
    if not examples:
        raise TunesmithError(f"data '{source}' has no usable example (all too long or without an answer)")
    return examples


def _stats(examples: list[TokenizedExample], rows: int, parts: list[SplitStats]) -> SplitStats:
    s = SplitStats(rows=rows, examples=len(examples))
    s.lengths = [len(e.input_ids) for e in examples]
    s.supervised_tokens = sum(e.num_supervised for e in examples)
    for p in parts:
        s.dropped_too_long += p.dropped_too_long
        s.truncated += p.truncated
        s.dropped_no_supervised += p.dropped_no_supervised
    return s


def prepare_training_data(config: RunConfig, tokenizer) -> PreparedData:
    """prepare_data, plus task prefixes, weighted mixing and replay when the config asks for them."""
    from ..data.dataset import prepare_data

    if not needs_mixing(config):
        return prepare_data(config, tokenizer)
    from ..continual import load_task_conversations

    d, seed = config.data, config.train.seed
    apply_template_override(tokenizer, d.chat_template)
    tagged = load_task_conversations(config, "train")
    if d.eval:
        held = load_task_conversations(config, "eval")
    else:
        tagged, held = split_conversations(tagged, d.eval_split, seed)
    sources = d.train if isinstance(d.train, list) else [d.train]
    per_source, parts = [], []
    for i in range(len(sources)):
        examples, stats = tokenize_all(tokenizer, [(c, w) for c, w, k in tagged if k == i], config)
        if not examples:
            raise TunesmithError(
                f"data.train[{i}] = '{sources[i]}' has no training example left ({stats.dropped_too_long} longer than "
                f"data.max_length={d.max_length}, {stats.dropped_no_supervised} without a supervised token)"
            )
        per_source.append(examples)
        parts.append(stats)
    evaluation, eval_stats = tokenize_all(tokenizer, [(c, w) for c, w, _ in held], config)

    rng = random.Random(seed)
    sizes = [len(e) for e in per_source]
    weights = list(d.weights) if d.weights is not None else [float(n) for n in sizes]
    counts = largest_remainder(sum(sizes), weights)
    streams = [take(ex, c, rng) for ex, c in zip(per_source, counts)]
    n_task = sum(counts)
    mix = {
        "datasets": [
            {"source": str(src), "weight": w, "available": n, "used": c, "share": round(c / n_task, 4)}
            for src, w, n, c in zip(sources, weights, sizes, counts)
        ]
    }
    replay = config.regularize.replay
    if replay is not None:
        supervised = statistics.median(e.num_supervised for s in per_source for e in s)
        chunk = replay.chunk_tokens or int(min(d.max_length, max(16, supervised + 1)))
        pool = [x for src in (replay.source if isinstance(replay.source, list) else [replay.source])
                for x in source_examples(src, tokenizer, config, chunk)]
        n_replay = max(1, round(replay.ratio * n_task / (1 - replay.ratio)))
        replayed = take(pool, n_replay, rng)
        streams.append(replayed)
        sup = lambda xs: sum(sum(1 for t in e.labels[1:] if t != IGNORE_INDEX) for e in xs)  # noqa: E731
        task_sup = sum(sup(s) for s in streams[:-1])
        mix["replay"] = {
            "source": replay.source,
            "ratio": replay.ratio,
            "examples": n_replay,
            "share": round(n_replay / (n_task + n_replay), 4),
            "supervised_token_share": round(sup(replayed) / (task_sup + sup(replayed)), 4),
            "chunk_tokens": chunk if replay.source == GENERAL or GENERAL in _as_list(replay.source) else None,
            "available": len(pool),
        }
    train = interleave(streams)
    train_stats = _stats(train, sum(p.rows for p in parts), parts)
    return MixedData(train, evaluation, train_stats, eval_stats, mix=mix)


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def mix_stats(data: PreparedData) -> dict:
    """Extra data_stats.json entries for mixed data (nothing for plain data)."""
    mix = getattr(data, "mix", None)
    return {"mix": mix} if mix else {}
