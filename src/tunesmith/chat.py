"""A multi-turn chat session over a loaded model, streaming tokens as they are generated."""
from __future__ import annotations

import threading
from typing import Callable, Iterator

import torch

from .data.templates import render
from .inference import LoadedModel, stop_token_ids


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
        from transformers import TextIteratorStreamer

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
