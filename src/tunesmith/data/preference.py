"""Preference data: rows -> (prompt conversation, chosen reply, rejected reply) -> two masked token sequences.

The formats users have, detected per row from its keys:
- prompt: TRL's explicit prompt, `prompt` + `chosen` + `rejected`, each a string or a list of messages; also
  UltraFeedback-binarized rows, whose `chosen`/`rejected` repeat the prompt messages before the reply.
- implicit: TRL's implicit prompt, `chosen` and `rejected` full conversations that share every message but the
  last assistant reply.
- alpaca: `instruction` (+ `input`, `system`, `history`) + `chosen` + `rejected` strings (LLaMA-Factory).
- sharegpt: `conversations` (the prompt turns) + `chosen` / `rejected` as {from, value} (LLaMA-Factory).
- ultrafeedback: `instruction` + `completions` [{response, overall_score}] (the raw UltraFeedback release):
  the best-scored completion is chosen, the worst rejected.

Both replies are tokenized by the SFT path (masking.py) as the prompt plus one assistant turn, training on
that last turn only: the same chat template and span-based masking, so only the reply's tokens and its end
of turn carry log-probabilities, never the prompt's.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import RunConfig
from ..errors import TunesmithError
from .dataset import PreparedData, SplitStats, split_conversations
from .formats import Conversation, Message, to_conversation
from .loading import Row, load_rows
from .masking import TokenizedExample, tokenize_conversation
from .templates import apply_template_override

@dataclass(frozen=True)
class PreferencePair:
    prompt: Conversation  # ends with the message the replies answer
    chosen: Message
    rejected: Message
    where: str


@dataclass
class PreferenceExample:
    """A tokenized pair: two sequences with the same prompt tokens; labels only on each reply."""

    chosen: TokenizedExample
    rejected: TokenizedExample
    where: str = ""

    @property
    def num_supervised(self) -> int:
        return self.chosen.num_supervised + self.rejected.num_supervised

    # The pair read as one TokenizedExample (chosen then rejected), for code that walks a run's examples
    # (the training doctor): the same ids and labels as the pair's dataset item.
    @property
    def input_ids(self) -> list[int]:
        return self.chosen.input_ids + self.rejected.input_ids

    @property
    def labels(self) -> list[int]:
        return self.chosen.labels + self.rejected.labels

    @property
    def categories(self) -> list[str]:
        return self.chosen.categories + self.rejected.categories

    @property
    def truncated(self) -> bool:
        return self.chosen.truncated or self.rejected.truncated


def detect_preference_format(row: Row) -> str:
    d = row.data
    if "completions" in d and "instruction" in d:
        return "ultrafeedback"
    for needed in ("chosen", "rejected"):
        if needed not in d or d[needed] is None:
            raise TunesmithError(
                f"{row.where}: missing field '{needed}': a preference row needs both 'chosen' and 'rejected' "
                f"(row has {sorted(d)})"
            )
    if "prompt" in d:
        return "prompt"
    if "instruction" in d:
        return "alpaca"
    if "conversations" in d:
        return "sharegpt"
    if isinstance(d["chosen"], list) and isinstance(d["rejected"], list):
        return "implicit"
    raise TunesmithError(
        f"{row.where}: 'chosen' and 'rejected' are text but there is no 'prompt' (or 'instruction'); add the prompt, "
        "or give chosen and rejected as full conversations (lists of {role, content}) that share the prompt"
    )


def to_preference_pair(row: Row, system_prompt: str | None = None) -> PreferencePair:
    """The row's prompt and its two replies, with every problem named by the row's file and line."""
    fmt = detect_preference_format(row)
    prompt, chosen, rejected = _CONVERTERS[fmt](row)
    if system_prompt and prompt and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": system_prompt}, *prompt]
    if not any(m["content"].strip() for m in prompt if m["role"] != "system"):
        raise TunesmithError(f"{row.where}: the prompt is empty; write the request the chosen and rejected replies answer")
    if prompt[-1]["role"] == "assistant":
        raise TunesmithError(f"{row.where}: the prompt ends with an assistant message; it must end with the request "
                             "(user) that the chosen and rejected replies answer")
    for name, reply in (("chosen", chosen), ("rejected", rejected)):
        if not reply["content"].strip():
            raise TunesmithError(f"{row.where}: the {name} reply is empty; write it, or drop this row")
    if chosen["content"] == rejected["content"]:
        raise TunesmithError(f"{row.where}: chosen and rejected are identical, so there is no preference to learn; "
                             "fix one of them or drop this row")
    return PreferencePair(prompt, chosen, rejected, row.where)


def _reply(value, row: Row, field: str, prompt: Conversation) -> Message:
    """One assistant reply from a string, a message, or a list of messages (which may repeat the prompt first)."""
    if isinstance(value, str):
        return {"role": "assistant", "content": value}
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise TunesmithError(f"{row.where}: '{field}' must be text or a list of {{role, content}} messages, "
                             f"got {type(value).__name__}")
    messages = _messages(value, row, field)
    if messages[: len(prompt)] == prompt and len(messages) > len(prompt):
        messages = messages[len(prompt):]  # UltraFeedback-binarized: the conversation repeats the prompt
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise TunesmithError(f"{row.where}: '{field}' must be one assistant reply (after the prompt), got roles "
                             f"{[m['role'] for m in messages]}")
    return messages[0]


def _messages(value: list, row: Row, field: str) -> Conversation:
    """A list of {role, content} messages (a prompt may end with any role, so not formats.py's conversation check)."""
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise TunesmithError(f"{row.where}: {field}[{i}] must be an object with 'role' and 'content'")
        if not isinstance(m["content"], (str, type(None))):
            raise TunesmithError(f"{row.where}: {field}[{i}].content must be text, got {type(m['content']).__name__}")
        out.append({"role": str(m["role"]), "content": m["content"] or ""})
    return out


def _from_prompt(row: Row):
    raw = row.data["prompt"]
    if isinstance(raw, list):
        prompt = _messages(raw, row, "prompt")
    elif isinstance(raw, (str, type(None))):
        prompt = [{"role": "user", "content": raw or ""}]
    else:
        raise TunesmithError(f"{row.where}: 'prompt' must be text or a list of messages, got {type(raw).__name__}")
    return prompt, _reply(row.data["chosen"], row, "chosen", prompt), _reply(row.data["rejected"], row, "rejected", prompt)


def _from_implicit(row: Row):
    chosen = _messages(row.data["chosen"], row, "chosen")
    rejected = _messages(row.data["rejected"], row, "rejected")
    if chosen[:-1] != rejected[:-1]:
        raise TunesmithError(f"{row.where}: the chosen and rejected conversations differ before their last message, so "
                             "they do not share one prompt; make every message but the last reply the same, or give "
                             "the prompt in a 'prompt' field")
    prompt = chosen[:-1]
    return prompt, _reply(chosen[-1:], row, "chosen", prompt), _reply(rejected[-1:], row, "rejected", prompt)


def _from_alpaca(row: Row):
    chosen = to_conversation(Row({**row.data, "output": row.data["chosen"]}, row.where), "alpaca")
    rejected = _text_reply(row.data["rejected"], row, "rejected")
    return chosen[:-1], chosen[-1], rejected


def _from_sharegpt(row: Row):
    d = row.data
    turns = d["conversations"] if isinstance(d["conversations"], list) else []
    conversation = to_conversation(Row({**d, "conversations": [*turns, d["chosen"]]}, row.where), "sharegpt")
    rejected = to_conversation(Row({**d, "conversations": [*turns, d["rejected"]]}, row.where), "sharegpt")
    return conversation[:-1], conversation[-1], rejected[-1]


def _from_ultrafeedback(row: Row):
    completions = row.data["completions"]
    if not isinstance(completions, list) or len(completions) < 2:
        raise TunesmithError(f"{row.where}: 'completions' must list at least two {{response, overall_score}} objects")
    scored = []
    for i, c in enumerate(completions):
        if not isinstance(c, dict) or "response" not in c or not isinstance(c.get("overall_score"), (int, float)):
            raise TunesmithError(f"{row.where}: completions[{i}] must be an object with 'response' and a numeric "
                                 "'overall_score'")
        scored.append((float(c["overall_score"]), i))
    best, worst = max(scored), min(scored)
    if best[0] == worst[0]:
        raise TunesmithError(f"{row.where}: every completion has overall_score {best[0]:g}, so none is preferred; "
                             "drop this row")
    prompt = [{"role": "user", "content": _text(row.data["instruction"], row, "instruction")}]
    return (prompt, _text_reply(completions[best[1]]["response"], row, f"completions[{best[1]}].response"),
            _text_reply(completions[worst[1]]["response"], row, f"completions[{worst[1]}].response"))


def _text(value, row: Row, field: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise TunesmithError(f"{row.where}: '{field}' must be text, got {type(value).__name__}")
    return value


def _text_reply(value, row: Row, field: str) -> Message:
    return {"role": "assistant", "content": _text(value, row, field)}


_CONVERTERS = {
    "prompt": _from_prompt,
    "implicit": _from_implicit,
    "alpaca": _from_alpaca,
    "sharegpt": _from_sharegpt,
    "ultrafeedback": _from_ultrafeedback,
}


def tokenize_pair(tokenizer, pair: PreferencePair, max_length: int | None = None,
                  truncation: str = "drop") -> PreferenceExample | None:
    """Prompt + each reply through the SFT masking, training on the reply only; None when one is too long
    and truncation is 'drop'."""
    sides = [tokenize_conversation(tokenizer, [*pair.prompt, reply], "last_assistant", max_length, truncation, pair.where)
             for reply in (pair.chosen, pair.rejected)]
    if sides[0] is None or sides[1] is None:
        return None
    return PreferenceExample(sides[0], sides[1], pair.where)


def load_pairs(source, config: RunConfig) -> list[PreferencePair]:
    return [to_preference_pair(row, config.data.system_prompt) for row in load_rows(source, config.data.split)]


def tokenize_pairs(tokenizer, pairs: list[PreferencePair], config: RunConfig) -> tuple[list[PreferenceExample], SplitStats]:
    stats = SplitStats(rows=len(pairs))
    out = []
    for pair in pairs:
        ex = tokenize_pair(tokenizer, pair, config.data.max_length, config.data.truncation)
        if ex is None:
            stats.dropped_too_long += 1
            continue
        if ex.chosen.num_supervised == 0 or ex.rejected.num_supervised == 0:
            stats.dropped_no_supervised += 1
            continue
        stats.truncated += ex.truncated
        stats.lengths.append(len(ex.chosen.input_ids) + len(ex.rejected.input_ids))
        stats.supervised_tokens += ex.num_supervised
        out.append(ex)
    stats.examples = len(out)
    return out, stats


def split_pairs(config: RunConfig) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """The train and held-out pairs: data.eval, or the deterministic data.eval_split of train."""
    train = load_pairs(config.data.train, config)
    if config.data.eval:
        return train, load_pairs(config.data.eval, config)
    return split_conversations(train, config.data.eval_split, config.train.seed)


def prepare_preference_data(config: RunConfig, tokenizer) -> PreparedData:
    """The train and eval pairs of a preference run, as the trainer receives them, with their stats
    (lengths count chosen + rejected tokens of a pair; supervised tokens both replies)."""
    apply_template_override(tokenizer, config.data.chat_template)
    train, held = split_pairs(config)
    examples, stats = tokenize_pairs(tokenizer, train, config)
    evaluation, eval_stats = tokenize_pairs(tokenizer, held, config)
    if not examples:
        raise TunesmithError(
            f"no training pair is left: {stats.dropped_too_long} of {stats.rows} are longer than "
            f"data.max_length={config.data.max_length} tokens and {stats.dropped_no_supervised} lost a whole reply "
            "to truncation; raise data.max_length"
        )
    return PreparedData(examples, evaluation, stats, eval_stats)
