"""Convert rows of any supported format into conversations: lists of {role, content} messages."""
from __future__ import annotations

from typing import Any

from ..errors import TunesmithError
from .loading import Row

Message = dict[str, str]
Conversation = list[Message]

FORMAT_KEYS = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
}
SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
    "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "system": "system", "tool": "tool",
    "function_call": "assistant", "observation": "tool", "function": "tool",
}
VALID_ROLES = {"system", "user", "assistant", "tool"}


def detect_format(row: Row) -> str:
    for fmt, keys in FORMAT_KEYS.items():
        if all(k in row.data for k in keys):
            return fmt
    raise TunesmithError(
        f"{row.where}: cannot tell the data format from the keys {sorted(row.data)}; expected 'messages' (messages), "
        "'conversations' (sharegpt), 'instruction'+'output' (alpaca) or 'prompt'+'completion'. "
        "Rename the fields or set data.format"
    )


def to_conversation(row: Row, fmt: str, system_prompt: str | None = None) -> Conversation:
    if fmt == "auto":
        fmt = detect_format(row)
    converters = {
        "messages": _from_messages,
        "sharegpt": _from_sharegpt,
        "alpaca": _from_alpaca,
        "prompt_completion": _from_prompt_completion,
    }
    if fmt not in converters:
        raise TunesmithError(f"data.format '{fmt}' is unknown; use one of auto, {', '.join(converters)}")
    missing = [k for k in FORMAT_KEYS[fmt] if k not in row.data]
    if missing:
        raise TunesmithError(
            f"{row.where}: missing field '{missing[0]}' required by data.format={fmt} (row has {sorted(row.data)})"
        )
    conv = converters[fmt](row)
    if system_prompt and conv and conv[0]["role"] != "system":
        conv.insert(0, {"role": "system", "content": system_prompt})
    _validate(conv, row)
    return conv


def _text(value: Any, row: Row, field: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, (str, int, float)):
        raise TunesmithError(f"{row.where}: field '{field}' must be text, got {type(value).__name__}")
    return str(value)


def _from_messages(row: Row) -> Conversation:
    msgs = row.data["messages"]
    if not isinstance(msgs, list):
        raise TunesmithError(f"{row.where}: 'messages' must be a list of {{role, content}} objects")
    conv = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise TunesmithError(f"{row.where}: messages[{i}] must be an object with 'role' and 'content'")
        if m["content"] is None and m["role"] == "assistant" and not m.get("tool_calls"):
            raise TunesmithError(f"{row.where}: messages[{i}].content is null for the assistant; write the answer "
                                 "to learn, or drop this row")
        conv.append({"role": str(m["role"]), "content": _text(m["content"], row, f"messages[{i}].content")})
    return conv


def _from_sharegpt(row: Row) -> Conversation:
    turns = row.data["conversations"]
    if not isinstance(turns, list):
        raise TunesmithError(f"{row.where}: 'conversations' must be a list of {{from, value}} objects")
    conv = []
    if row.data.get("system"):
        conv.append({"role": "system", "content": _text(row.data["system"], row, "system")})
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or "from" not in t or "value" not in t:
            raise TunesmithError(f"{row.where}: conversations[{i}] must be an object with 'from' and 'value'")
        role = SHAREGPT_ROLES.get(str(t["from"]).lower())
        if role is None:
            raise TunesmithError(
                f"{row.where}: conversations[{i}].from = '{t['from']}' is not a known speaker; "
                f"use one of {', '.join(sorted(SHAREGPT_ROLES))}"
            )
        conv.append({"role": role, "content": _text(t["value"], row, f"conversations[{i}].value")})
    return conv


def _from_alpaca(row: Row) -> Conversation:
    d = row.data
    conv: Conversation = []
    if d.get("system"):
        conv.append({"role": "system", "content": _text(d["system"], row, "system")})
    for i, pair in enumerate(d.get("history") or []):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise TunesmithError(f"{row.where}: history[{i}] must be a [question, answer] pair")
        conv.append({"role": "user", "content": _text(pair[0], row, f"history[{i}][0]")})
        conv.append({"role": "assistant", "content": _text(pair[1], row, f"history[{i}][1]")})
    instruction = _text(d["instruction"], row, "instruction")
    extra = _text(d.get("input"), row, "input")
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    conv.append({"role": "user", "content": prompt})
    conv.append({"role": "assistant", "content": _text(d["output"], row, "output")})
    return conv


def _from_prompt_completion(row: Row) -> Conversation:
    prompt, completion = row.data["prompt"], row.data["completion"]
    # TRL's conversational prompt-completion: both sides already lists of messages.
    if isinstance(prompt, list) and isinstance(completion, list):
        return _from_messages(Row({"messages": prompt + completion}, row.where))
    return [
        {"role": "user", "content": _text(prompt, row, "prompt")},
        {"role": "assistant", "content": _text(completion, row, "completion")},
    ]


def _validate(conv: Conversation, row: Row) -> None:
    if not conv:
        raise TunesmithError(f"{row.where}: the conversation is empty")
    for i, m in enumerate(conv):
        if m["role"] not in VALID_ROLES:
            raise TunesmithError(
                f"{row.where}: message {i} has role '{m['role']}'; use one of {', '.join(sorted(VALID_ROLES))}"
            )
    if not any(m["role"] == "assistant" for m in conv):
        raise TunesmithError(f"{row.where}: no assistant message, so nothing to learn from; add the answer")
    if conv[-1]["role"] != "assistant":
        raise TunesmithError(
            f"{row.where}: the last message is from '{conv[-1]['role']}', not the assistant; "
            "end each example with the answer to learn"
        )
