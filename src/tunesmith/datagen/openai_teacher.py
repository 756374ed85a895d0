"""A teacher behind any OpenAI-compatible endpoint (tunesmith serve, vLLM, Ollama, llama.cpp's server, a hosted
API) through the official `openai` client: bounded concurrency, our own retries with exponential backoff (so
they are counted), seeded sampling, and errors a user can act on."""
from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

import openai

from ..errors import TunesmithError
from .teacher import Reply, Request, Usage

RETRYABLE = (openai.RateLimitError, openai.InternalServerError, openai.APITimeoutError, openai.APIConnectionError)


class OpenAITeacher:
    def __init__(self, base_url: str, *, model: Optional[str], api_key: str, concurrency: int = 4, retries: int = 5,
                 timeout: float = 120.0, backoff: float = 1.0):
        self.base_url = base_url.rstrip("/")
        self.client = openai.OpenAI(base_url=self.base_url, api_key=api_key, max_retries=0, timeout=timeout)
        self.concurrency = concurrency
        self.retries = retries
        self.backoff = backoff
        self.usage = Usage()
        self.model = model or self._only_model()
        self.name = f"{self.base_url} ({self.model})"

    def generate(self, requests: Sequence[Request]) -> list[Reply]:
        if len(requests) <= 1 or self.concurrency == 1:
            return [self._one(r) for r in requests]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(requests))) as pool:
            return list(pool.map(self._one, requests))

    def _only_model(self) -> str:
        """Without --model, the endpoint's first listed model (what a single-model server serves)."""
        models = self._call(lambda: self.client.models.list())
        names = [m.id for m in getattr(models, "data", []) or []]
        if not names:
            raise TunesmithError(f"teacher {self.base_url} lists no models at /models; name one with --model")
        return names[0]

    def _one(self, request: Request) -> Reply:
        try:
            response = self._call(lambda: self.client.chat.completions.create(
                model=self.model, messages=request.messages, max_tokens=request.max_tokens,
                temperature=request.temperature, top_p=request.top_p, seed=request.seed,
                stop=list(request.stop) or None))
        except openai.BadRequestError as exc:  # this request only (e.g. too long for the context): a counted drop
            self.usage.add(failed=1)
            return Reply("", "error", f"rejected by the teacher ({exc.status_code})")
        usage = getattr(response, "usage", None)
        if usage is not None:
            self.usage.add(prompt_tokens=usage.prompt_tokens or 0, completion_tokens=usage.completion_tokens or 0)
        choices = getattr(response, "choices", None) or []
        content = choices[0].message.content if choices and choices[0].message else None
        if not isinstance(content, str):
            self.usage.add(failed=1)
            return Reply("", "error", "malformed reply (no message content)")
        return Reply(content, "length" if choices[0].finish_reason == "length" else "stop")

    def _call(self, send):
        """Send with retries on 429, 5xx, timeouts and refused connections; a failure that retrying cannot fix
        (or retries used up) stops the run with one line: what was written so far stays, and a rerun continues."""
        for attempt in range(self.retries + 1):
            self.usage.add(requests=1, retries=1 if attempt else 0)
            try:
                return send()
            except RETRYABLE as exc:
                if attempt == self.retries:
                    raise TunesmithError(self._gave_up(exc)) from None
                time.sleep(self.backoff * 2 ** attempt * (0.5 + random.random()))
            except openai.AuthenticationError:
                raise TunesmithError(f"teacher {self.base_url} refused the API key (401); set it with "
                                     "--key-env NAME (an environment variable holding the key)") from None
            except openai.PermissionDeniedError:
                raise TunesmithError(f"teacher {self.base_url} denied access (403); check the key's permissions") from None
            except openai.NotFoundError:
                raise TunesmithError(f"teacher {self.base_url} has no model '{getattr(self, 'model', '?')}' or no "
                                     "OpenAI API at this URL (404); check --model and that the URL ends in /v1") from None

    def _gave_up(self, exc: Exception) -> str:
        tries = f"after {self.retries + 1} tries"
        if isinstance(exc, openai.APITimeoutError):
            why = "timed out"
        elif isinstance(exc, openai.APIConnectionError):
            why = "is unreachable (connection failed)"
        else:
            why = f"kept answering HTTP {getattr(exc, 'status_code', '?')}"
        return (f"teacher {self.base_url} {why} {tries}; start or check the server (--teacher URL, ending in /v1), "
                "then rerun the same command: it continues where it stopped")
