"""The one way from a config to what a run trains and is scored on.

`prepare_data` builds the train and eval examples: load and convert every data.train (and data.eval)
file, put each dataset's task prefix on it, hold out the eval split, tokenize, and, when the config
asks for it, mix the datasets by weight and add replay examples. `train`, `train --dry-run`,
`data inspect|stats|check` all read their data from here, so what they report is what training sees.
`eval_conversations` gives the same held-out conversations untokenized, for scoring by generation
(`eval`, `eval --forgetting`), without paying for the training side.
"""
from __future__ import annotations

from ..config import RunConfig
from ..errors import TunesmithError
from ..objectives import get_objective
from .dataset import PreparedData, split_conversations, tokenize_all
from .formats import Conversation
from .mixing import mix_train
from .preference import prepare_preference_data, split_pairs
from .prefixes import load_task_conversations
from .templates import apply_template_override

Tagged = tuple[Conversation, str, int]  # a conversation, where it came from, its data.train index


def needs_mixing(config: RunConfig) -> bool:
    """Whether the training examples are composed per dataset (weights, replay, task prefixes) rather than
    taken as they come; the composed ones keep their order in training."""
    d = config.data
    return d.weights is not None or config.regularize.replay is not None or bool(d.task_prefix)


def split_tasks(config: RunConfig) -> tuple[list[Tagged], list[Tagged]]:
    """The train and held-out conversations, task prefixes applied: data.eval, or data.eval_split of train."""
    train = load_task_conversations(config, "train")
    return hold_out(config, train, load_task_conversations(config, "eval") if config.data.eval else [])


def hold_out(config: RunConfig, train: list[Tagged], evaluation: list[Tagged]) -> tuple[list[Tagged], list[Tagged]]:
    """(train, held-out) from loaded data.train and data.eval conversations: data.eval when the config has one,
    else the deterministic data.eval_split of train."""
    if config.data.eval:
        return train, evaluation
    return split_conversations(train, config.data.eval_split, config.train.seed)


def untagged(tagged: list[Tagged]) -> list[tuple[Conversation, str]]:
    return [(c, w) for c, w, _ in tagged]


def prepare_data(config: RunConfig, tokenizer) -> PreparedData:
    """The train and eval examples of a run, exactly as the trainer receives them, with their stats."""
    if get_objective(config.train.objective).preference:
        return prepare_preference_data(config, tokenizer)  # (prompt, chosen, rejected) pairs, not conversations
    apply_template_override(tokenizer, config.data.chat_template)
    train, held = split_tasks(config)
    mixed = needs_mixing(config)
    if mixed:
        examples, stats, mix = mix_train(config, tokenizer, train)
    else:
        examples, stats = tokenize_all(tokenizer, untagged(train), config)
        mix = {}
    evaluation, eval_stats = tokenize_all(tokenizer, untagged(held), config)
    if not examples:
        raise TunesmithError(
            f"no training example is left: {stats.dropped_too_long} of {stats.rows} are longer than "
            f"data.max_length={config.data.max_length} tokens and {stats.dropped_no_supervised} have no "
            "supervised token; raise data.max_length or set data.truncation: truncate"
        )
    return PreparedData(examples, evaluation, stats, eval_stats, mix=mix, ordered=mixed)


def eval_conversations(config: RunConfig) -> list[tuple[Conversation, str]]:
    """The held-out conversations prepare_data tokenizes for eval: data.eval, or the split training held out.
    A preference run's are its held-out prompts with the chosen reply as the answer to score against."""
    if get_objective(config.train.objective).preference:
        held = [(pair.prompt + [pair.chosen], pair.where) for pair in split_pairs(config)[1]]
    else:
        held = untagged(split_tasks(config)[1])
    if not held:
        raise TunesmithError("no eval data: set data.eval, or a data.eval_split > 0 with more than one training row")
    return held
