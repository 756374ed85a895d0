"""The chat template a run trained with, made to travel: its default system prompt baked in, its end of turn,
and its pieces per role (for runtimes such as Ollama that do not run Jinja).

A served model answers like the trained one only when the prompt is rendered the same way. `data.system_prompt`
is added by tunesmith's data pipeline, not by the template, so an exported template carries it itself.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from ..data.masking import END_MARKERS
from ..data.templates import render
from ..errors import TunesmithError

# Placeholders no real template writes; rendering them shows where each message's content goes.
SYSTEM, USER, ASSISTANT, USER2 = "\u27e6tunesmith:system\u27e7", "\u27e6tunesmith:user\u27e7", \
    "\u27e6tunesmith:assistant\u27e7", "\u27e6tunesmith:user2\u27e7"


def served_template(template: str, system_prompt: str | None) -> str:
    """`template` with `system_prompt` as the system message of every conversation that brings none.

    The string is written as a JSON literal, which Jinja reads as the same string (its escapes are Python's).
    """
    if not system_prompt:
        return template
    literal = json.dumps(system_prompt, ensure_ascii=True)
    return ("{%- if not messages or messages[0]['role'] != 'system' %}"
            f"{{%- set messages = [{{'role': 'system', 'content': {literal}}}] + messages %}}"
            "{%- endif %}" + template)


def end_of_turn(tokenizer) -> str:
    """The marker the template writes after an assistant's answer (`<|im_end|>` for ChatML)."""
    rendered = render(tokenizer, [{"role": "user", "content": USER}, {"role": "assistant", "content": ASSISTANT}])
    after = rendered.split(ASSISTANT, 1)[1]
    for marker in sorted(END_MARKERS, key=after.find):
        if marker in after and marker in tokenizer.get_vocab():
            return marker
    raise TunesmithError(
        f"the chat template writes no known end-of-turn token ({', '.join(END_MARKERS)}) after an assistant "
        "message; set data.chat_template to a template that ends each turn with one"
    )


@dataclass(frozen=True)
class RolePieces:
    """A template that renders every message as prefix + content + suffix, one after the other."""

    wrappers: dict  # role -> (prefix, suffix)
    generation_prompt: str  # after the last message, when the model is to answer
    default_system: str | None  # the system message the template adds when a conversation has none

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        text = "".join(self.wrappers[m["role"]][0] + m["content"] + self.wrappers[m["role"]][1]
                                    for m in messages)
        return text + (self.generation_prompt if add_generation_prompt else "")


def role_pieces(tokenizer) -> RolePieces:
    """Cut the template's renderings of a probe conversation into per-role pieces, then check that the pieces
    rebuild what the template renders for other conversations (else the template is not per-message)."""
    conv = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER},
            {"role": "assistant", "content": ASSISTANT}, {"role": "user", "content": USER2}]
    # transformers refuses to render an empty conversation, so text before the first message (a BOS the template
    # writes itself) lands in that message's prefix; the rebuild check below then refuses the template.
    wrappers, done = {}, ""
    for k, message in enumerate(conv, 1):
        text = render(tokenizer, conv[:k])
        if not text.startswith(done) or message["content"] not in text[len(done):]:
            raise _not_per_message()
        prefix, suffix = text[len(done):].split(message["content"], 1)
        wrappers.setdefault(message["role"], (prefix, suffix))
        if wrappers[message["role"]] != (prefix, suffix):
            raise _not_per_message()
        done = text
    full = render(tokenizer, conv, add_generation_prompt=True)
    if not full.startswith(done):
        raise _not_per_message()
    pieces = RolePieces(wrappers, full[len(done):], _default_system(tokenizer, wrappers))
    _check_rebuilds(tokenizer, pieces)
    return pieces


def _default_system(tokenizer, wrappers: dict) -> str | None:
    alone = render(tokenizer, [{"role": "user", "content": USER}])
    before_user = alone[:alone.index(wrappers["user"][0] + USER)]
    prefix, suffix = wrappers["system"]
    if not before_user:
        return None
    if not (before_user.startswith(prefix) and before_user.endswith(suffix)):
        raise _not_per_message()
    return before_user[len(prefix):len(before_user) - len(suffix)]


def _check_rebuilds(tokenizer, pieces: RolePieces) -> None:
    for conv in ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                  {"role": "user", "content": "Two?"}],
                 [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]):
        with_system = conv if conv[0]["role"] == "system" or pieces.default_system is None else \
            [{"role": "system", "content": pieces.default_system}, *conv]
        if pieces.render(with_system) != render(tokenizer, conv, add_generation_prompt=True):
            raise _not_per_message()


def _not_per_message() -> TunesmithError:
    return TunesmithError(
        "the chat template does not render each message as prefix + content + suffix, so it cannot be written as "
        "an Ollama TEMPLATE; write one by hand, or train with a per-message template (ChatML, Llama-3) in "
        "data.chat_template"
    )
