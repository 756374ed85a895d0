"""Task prefixes (`data.task_prefix`): a short tag such as `[Translation]` put before the first user message.

Every example of a dataset gets its dataset's prefix, the same way in training, eval and chat, so one
model can tell its tasks apart and `--adapter auto` can route by it. A config gives one prefix for all
data or one per data.train entry; data.eval then lists one file per training dataset, in the same order.
"""
from __future__ import annotations

from ..config import RunConfig
from ..errors import TunesmithError
from .dataset import load_conversations


def apply_task_prefix(conv: list[dict], prefix: str | None) -> list[dict]:
    """A copy of `conv` whose first user message starts with `prefix` (unchanged if it already does)."""
    if not prefix:
        return conv
    out = [dict(m) for m in conv]
    for m in out:
        if m["role"] == "user":
            if not m["content"].startswith(prefix):
                m["content"] = f"{prefix} {m['content']}"
            break
    return out


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def train_prefixes(config: RunConfig) -> list[str | None]:
    """One prefix (or None) per data.train entry."""
    n = len(_as_list(config.data.train))
    p = config.data.task_prefix
    return list(p) if isinstance(p, list) else [p] * n


def eval_prefixes(config: RunConfig) -> list[str | None]:
    """One prefix per data.eval entry: the single prefix, or the train prefixes when eval lists one file per dataset."""
    p = config.data.task_prefix
    evals = _as_list(config.data.eval)
    if not isinstance(p, list):
        return [p] * len(evals)
    if len(evals) == len(p):
        return list(p)
    distinct = {x for x in p if x}
    if len(distinct) <= 1 and all(p):
        return [next(iter(distinct), None)] * len(evals)
    raise TunesmithError(
        f"data.task_prefix has one prefix per training dataset ({len(p)}), so data.eval must list one eval file per "
        f"training dataset in the same order (it lists {len(evals)})"
    )


def task_prefixes(config: RunConfig) -> list[str]:
    """The distinct prefixes a config trains with."""
    seen: list[str] = []
    for p in train_prefixes(config):
        if p and p not in seen:
            seen.append(p)
    return seen


def load_task_conversations(config: RunConfig, which: str) -> list[tuple[list[dict], str, int]]:
    """(conversation, where, dataset index) for data.train or data.eval, each with its dataset's task prefix."""
    sources = _as_list(config.data.train if which == "train" else config.data.eval)
    prefixes = train_prefixes(config) if which == "train" else eval_prefixes(config)
    out = []
    for i, (src, prefix) in enumerate(zip(sources, prefixes)):
        out.extend((apply_task_prefix(conv, prefix), where, i) for conv, where in load_conversations(src, config))
    return out
