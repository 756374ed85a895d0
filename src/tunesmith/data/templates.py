"""Chat-template handling: overrides, rendering, and template errors turned into advice."""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import TunesmithError
from .formats import Conversation


def apply_template_override(tokenizer, chat_template: str | os.PathLike | None) -> None:
    """`data.chat_template` may be a path to a Jinja file or the template itself."""
    if not chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise TunesmithError(
                "the tokenizer has no chat template: set data.chat_template to a Jinja template "
                "(a file path or an inline string), e.g. the ChatML template"
            )
        return
    chat_template = str(chat_template)
    looks_inline = "{%" in chat_template or "{{" in chat_template
    if not looks_inline:
        path = Path(chat_template).expanduser()
        if not path.is_file():
            raise TunesmithError(
                f"data.chat_template = '{chat_template}' is neither an existing file nor a Jinja template string"
            )
        chat_template = path.read_text(encoding="utf-8")
    _check_syntax(chat_template, "" if looks_inline else f" ({path})")
    tokenizer.chat_template = chat_template


def _check_syntax(template: str, where: str) -> None:
    """Compile the template as transformers will, so a Jinja typo is one line naming its line, up front."""
    from jinja2 import TemplateSyntaxError
    from transformers.utils.chat_template_utils import _compile_jinja_template

    try:
        _compile_jinja_template(template)
    except TemplateSyntaxError as exc:
        raise TunesmithError(f"data.chat_template{where}: template syntax error at line {exc.lineno}: {exc.message}; "
                             "fix the Jinja template") from None


def render(tokenizer, messages: Conversation, add_generation_prompt: bool = False, where: str = "") -> str:
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except TemplateError as exc:
        roles = sorted({m["role"] for m in messages})
        hints = []
        if "system" in roles:
            hints.append(
                " Many templates (Gemma, Mistral) have no system role: drop the system messages, "
                "fold them into the first user message, or set data.chat_template to a template that accepts them."
            )
        if "alternate" in str(exc).lower():
            hints.append(" This template needs user/assistant turns that alternate, starting with user; fix the data order.")
        hint = "".join(hints)
        prefix = f"{where}: " if where else ""
        raise TunesmithError(f"{prefix}the chat template rejected this conversation (roles {roles}): {exc}.{hint}") from None


def marks_roles(tokenizer) -> bool:
    """A template that renders a user and an assistant message identically cannot teach who speaks."""
    probe = "tunesmith-probe"
    try:
        as_user = render(tokenizer, [{"role": "user", "content": probe}])
        as_assistant = render(tokenizer, [{"role": "user", "content": "x"}, {"role": "assistant", "content": probe}])
        as_user2 = render(tokenizer, [{"role": "user", "content": "x"}, {"role": "user", "content": probe}])
    except TunesmithError:
        return True  # a template strict enough to reject the probe distinguishes roles
    del as_user
    return as_assistant != as_user2
