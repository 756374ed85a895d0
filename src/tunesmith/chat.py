"""A multi-turn chat session over a loaded model, streaming tokens as they are generated.

A model that serves several tasks (task prefixes, continual runs) gets a TaskChatSession, which routes
each message to its task's adapters through routing.py, the way `eval --adapter` and the server do.
"""
from __future__ import annotations

import threading
from typing import Callable, Iterator

import torch

from .data.templates import render
from .inference import LoadedModel, stop_token_ids
from .routing import Route, Router, router_for, switch


class ChatSession:
    def __init__(self, loaded: LoadedModel, system: str | None = None, max_new_tokens: int = 256, temperature: float = 0.0):
        self.loaded = loaded
        self.system = system
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.history: list[dict] = []

    def reset(self) -> None:
        self.history = []

    def set_system(self, text: str | None) -> None:
        self.system = text or None

    def messages(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history

    def stream(self, user_text: str) -> Iterator[str]:
        """Yield the answer piece by piece; the whole answer joins the history when done."""
        from transformers import TextIteratorStreamer  # heavy: transformers loads only when a chat generates

        tok, model = self.loaded.tokenizer, self.loaded.model
        self.history.append({"role": "user", "content": user_text})
        prompt = render(tok, self.messages(), add_generation_prompt=True)
        enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
        streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        sampling = {"do_sample": True, "temperature": self.temperature, "top_p": 0.95} if self.temperature > 0 else {"do_sample": False}
        kwargs = dict(
            **enc, max_new_tokens=self.max_new_tokens, streamer=streamer,
            eos_token_id=stop_token_ids(tok), pad_token_id=tok.pad_token_id, **sampling,
        )
        errors: list[BaseException] = []

        def run():
            try:
                with torch.inference_mode():
                    model.generate(**kwargs)
            except BaseException as exc:  # surfaced in the caller's thread below
                errors.append(exc)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        pieces = []
        for piece in streamer:
            pieces.append(piece)
            yield piece
        thread.join()
        if errors:
            self.history.pop()
            raise errors[0]
        self.history.append({"role": "assistant", "content": "".join(pieces).strip()})

    def reply(self, user_text: str, on_piece: Callable[[str], None] | None = None) -> str:
        pieces = []
        for piece in self.stream(user_text):
            pieces.append(piece)
            if on_piece:
                on_piece(piece)
        return "".join(pieces).strip()


class TaskChatSession(ChatSession):
    """Routes each turn: a fixed task (--adapter NAME), by the message's task prefix (auto), or the run's own task."""

    def __init__(self, loaded: LoadedModel, router: Router, **kwargs):
        super().__init__(loaded, **kwargs)
        self.router = router
        self.current: Route | None = None

    def _route_turn(self, text: str) -> str:
        route = self.router.choose(text, self.current)
        if route is not None and not self.history:
            text = route.prefixed(text)  # as in training: the prefix starts the first user message
        switch(self.loaded.model, route, self.current)
        self.current = route
        return text

    def stream(self, user_text: str):
        return super().stream(self._route_turn(user_text))


def make_chat_session(loaded: LoadedModel, adapter: str | None = None, **kwargs) -> ChatSession:
    """A ChatSession that puts the task prefix on the first user message and serves with the task's adapters.

    Without a `system` of its own it starts with the run's `data.system_prompt`, as training rendered every
    example (and as the server answers)."""
    if kwargs.get("system") is None and loaded.config is not None:
        kwargs["system"] = loaded.config.data.system_prompt
    router = router_for(loaded, adapter)
    return ChatSession(loaded, **kwargs) if router is None else TaskChatSession(loaded, router, **kwargs)
