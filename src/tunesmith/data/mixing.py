"""Weighted mixing of datasets and replay of general data, at exact shares.

Weighted mixing (`data.weights`, or `{path, weight}` entries in `data.train`): an epoch has as many
examples as the datasets together; dataset i contributes round(N * w_i / sum w) of them (largest
remainder, so the counts add up to N). A smaller dataset is repeated (whole reshuffled passes), a
larger one subsampled.

Replay (`regularize.replay`): r = round(ratio * N / (1 - ratio)) examples from the replay source are
added, so replay is `ratio` of the training examples. `general` replay examples are chunks of the
train part of the general corpus (data/general.py; never the held-out topics that `eval --forgetting`
measures), every token supervised, each as long as the task examples' median supervised tokens so the
ratio of examples is also the ratio of the loss.

Exact, not random: every stream is spread evenly through the epoch (item k of a stream of n sits at
(k + 0.5) / n), and training reads the order as given, so any window of m consecutive examples holds
within one of m * share from each stream, whatever the step budget.
"""
from __future__ import annotations

import random
import statistics

from ..config import RunConfig
from ..errors import TunesmithError
from .dataset import SplitStats, load_conversations, tokenize_all
from .general import general_chunks
from .masking import IGNORE_INDEX, TokenizedExample

GENERAL = "general"


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


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def source_examples(source, tokenizer, config: RunConfig, chunk_tokens: int) -> list[TokenizedExample]:
    """Examples of a replay source or EWC reference: `general` chunks, or data files in any supported format."""
    if source == GENERAL:
        return general_chunks(tokenizer, chunk_tokens)
    auto = config.model_copy(update={"data": config.data.model_copy(update={"format": "auto", "system_prompt": None})})
    examples, _ = tokenize_all(tokenizer, load_conversations(source, auto), auto)
    if not examples:
        raise TunesmithError(f"data '{source}' has no usable example (all too long or without an answer)")
    return examples


def mix_train(config: RunConfig, tokenizer, tagged: list) -> tuple[list[TokenizedExample], SplitStats, dict]:
    """The training examples of tagged (conversation, where, dataset index) rows, weighted and with replay,
    in their evenly spread order; their stats; and the mix they came from (for data_stats.json)."""
    per_source, parts = _per_source_examples(config, tokenizer, tagged)
    rng = random.Random(config.train.seed)
    streams, mix = _weighted_streams(config, per_source, rng)
    if config.regularize.replay is not None:
        replayed, mix["replay"] = _replay_stream(config, tokenizer, per_source, streams, rng)
        streams.append(replayed)
    train = interleave(streams)
    return train, _stats(train, sum(p.rows for p in parts), parts), mix


def _per_source_examples(config: RunConfig, tokenizer, tagged: list) -> tuple[list[list[TokenizedExample]], list[SplitStats]]:
    """Each data.train entry's examples; an entry with none left is an error (its weight would mean nothing)."""
    sources = _as_list(config.data.train)
    per_source, parts = [], []
    for i in range(len(sources)):
        examples, stats = tokenize_all(tokenizer, [(c, w) for c, w, k in tagged if k == i], config)
        if not examples:
            raise TunesmithError(
                f"data.train[{i}] = '{sources[i]}' has no training example left ({stats.dropped_too_long} longer than "
                f"data.max_length={config.data.max_length}, {stats.dropped_no_supervised} without a supervised token)"
            )
        per_source.append(examples)
        parts.append(stats)
    return per_source, parts


def _weighted_streams(config: RunConfig, per_source: list[list[TokenizedExample]], rng: random.Random) -> tuple[list[list], dict]:
    """One stream per dataset, its length set by its weight (by default its size); the mix for the report."""
    sizes = [len(e) for e in per_source]
    weights = list(config.data.weights) if config.data.weights is not None else [float(n) for n in sizes]
    counts = largest_remainder(sum(sizes), weights)
    streams = [take(ex, c, rng) for ex, c in zip(per_source, counts)]
    n_task = sum(counts)
    mix = {
        "datasets": [
            {"source": str(src), "weight": w, "available": n, "used": c, "share": round(c / n_task, 4)}
            for src, w, n, c in zip(_as_list(config.data.train), weights, sizes, counts)
        ]
    }
    return streams, mix


def _supervised_after_first(examples: list[TokenizedExample]) -> int:
    """Supervised tokens as the loss sees them: a first token never has a prediction to be scored on."""
    return sum(sum(1 for t in e.labels[1:] if t != IGNORE_INDEX) for e in examples)


def _replay_stream(config: RunConfig, tokenizer, per_source: list[list[TokenizedExample]], task_streams: list[list],
                   rng: random.Random) -> tuple[list[TokenizedExample], dict]:
    """`ratio` of the training examples from the replay source(s), and what data_stats.json says about them."""
    replay, d = config.regularize.replay, config.data
    supervised = statistics.median(e.num_supervised for s in per_source for e in s)
    chunk = replay.chunk_tokens or int(min(d.max_length, max(16, supervised + 1)))
    pool = [x for src in _as_list(replay.source) for x in source_examples(src, tokenizer, config, chunk)]
    n_task = sum(len(s) for s in task_streams)
    n_replay = max(1, round(replay.ratio * n_task / (1 - replay.ratio)))
    replayed = take(pool, n_replay, rng)
    task_sup = sum(_supervised_after_first(s) for s in task_streams)
    replay_sup = _supervised_after_first(replayed)
    info = {
        "source": replay.source,
        "ratio": replay.ratio,
        "examples": n_replay,
        "share": round(n_replay / (n_task + n_replay), 4),
        "supervised_token_share": round(replay_sup / (task_sup + replay_sup), 4),
        "chunk_tokens": chunk if GENERAL in _as_list(replay.source) else None,
        "available": len(pool),
    }
    return replayed, info


def _stats(examples: list[TokenizedExample], rows: int, parts: list[SplitStats]) -> SplitStats:
    """Stats of the mixed examples (repeats counted as often as they are trained), drops summed over the datasets."""
    s = SplitStats(rows=rows, examples=len(examples))
    s.lengths = [len(e.input_ids) for e in examples]
    s.supervised_tokens = sum(e.num_supervised for e in examples)
    for p in parts:
        s.dropped_too_long += p.dropped_too_long
        s.truncated += p.truncated
        s.dropped_no_supervised += p.dropped_no_supervised
    return s
