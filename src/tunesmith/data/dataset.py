"""The building blocks of a run's data: conversations from files, tokenized examples with the counts a user
needs to trust them, and the held-out split. data/assemble.py puts them together."""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from ..config import RunConfig
from .formats import Conversation, to_conversation
from .loading import load_rows
from .masking import TokenizedExample, tokenize_conversation


@dataclass
class SplitStats:
    rows: int = 0
    examples: int = 0
    dropped_too_long: int = 0
    truncated: int = 0
    dropped_no_supervised: int = 0
    lengths: list[int] = field(default_factory=list)
    supervised_tokens: int = 0

    @property
    def tokens(self) -> int:
        return sum(self.lengths)

    def as_dict(self) -> dict:
        lengths = sorted(self.lengths)

        def pct(p: float) -> int:
            return lengths[min(len(lengths) - 1, int(p / 100 * len(lengths)))] if lengths else 0

        return {
            "rows": self.rows,
            "examples": self.examples,
            "tokens": self.tokens,
            "supervised_tokens": self.supervised_tokens,
            "supervised_share": round(self.supervised_tokens / self.tokens, 4) if self.tokens else 0.0,
            "length_p50": pct(50),
            "length_p90": pct(90),
            "length_p99": pct(99),
            "length_max": lengths[-1] if lengths else 0,
            "dropped_too_long": self.dropped_too_long,
            "truncated": self.truncated,
            "dropped_no_supervised_tokens": self.dropped_no_supervised,
        }


@dataclass
class PreparedData:
    """A run's examples. Mixed data (`mix`: weighted datasets, replay) is `ordered`: train reads it as given."""

    train: list[TokenizedExample]
    eval: list[TokenizedExample]
    train_stats: SplitStats
    eval_stats: SplitStats
    mix: dict = field(default_factory=dict)
    ordered: bool = False

    def stats(self) -> dict:
        """What `data stats` reports and data_stats.json holds: the counts of both splits, and the mix if any."""
        out = {"train": self.train_stats.as_dict(), "eval": self.eval_stats.as_dict()}
        return {**out, "mix": self.mix} if self.mix else out


def load_conversations(source, config: RunConfig) -> list[tuple[Conversation, str]]:
    rows = load_rows(source, config.data.split)
    return [(to_conversation(r, config.data.format, config.data.system_prompt), r.where) for r in rows]


def tokenize_all(tokenizer, convs: list[tuple[Conversation, str]], config: RunConfig) -> tuple[list[TokenizedExample], SplitStats]:
    stats = SplitStats(rows=len(convs))
    out = []
    for conv, where in convs:
        ex = tokenize_conversation(
            tokenizer, conv, config.data.train_on, config.data.max_length, config.data.truncation, where
        )
        if ex is None:
            stats.dropped_too_long += 1
            continue
        if ex.num_supervised == 0:
            stats.dropped_no_supervised += 1
            continue
        stats.truncated += ex.truncated
        stats.lengths.append(len(ex.input_ids))
        stats.supervised_tokens += ex.num_supervised
        out.append(ex)
    stats.examples = len(out)
    return out, stats


def split_conversations(convs: list, eval_share: float, seed: int) -> tuple[list, list]:
    """A deterministic held-out split; at least one eval example when there is more than one row."""
    if eval_share <= 0 or len(convs) < 2:
        return convs, []
    order = list(range(len(convs)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(convs) - 1, max(1, int(round(len(convs) * eval_share))))
    held = set(order[:n_eval])
    return [c for i, c in enumerate(convs) if i not in held], [c for i, c in enumerate(convs) if i in held]
