"""The model that writes data: one `Teacher` protocol (distilabel's LLM: a name and `generate` on chat
messages) with two implementations, an OpenAI-compatible endpoint (`openai_teacher`) and a local model loaded
in-process (`local_teacher`). Steps only ever call `generate`, so they never know which one they talk to; `teachers.make_teacher` builds one."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Protocol, Sequence

from ..errors import TunesmithError

DEFAULT_LOCAL_TEACHER = "smollm2-135m-instruct"
# Tokens per teacher reply unless --max-tokens says otherwise: the built-in model on this 2-core CPU wrote 35 to
# 170 completion tokens a second over batches of 4 to 8 (bench/datagen_experiment.py), so a reply takes seconds,
# and 256 holds a list of 7 new tasks or a short answer.
DEFAULT_MAX_TOKENS = 256
MOST_MAX_TOKENS = 32768


def check_max_tokens(value: int) -> None:
    if not 1 <= value <= MOST_MAX_TOKENS:
        raise TunesmithError(f"--max-tokens must be between 1 and {MOST_MAX_TOKENS} tokens per teacher reply, "
                             f"got {value}")


@dataclass(frozen=True)
class Request:
    messages: list[dict]
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 0.7
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Reply:
    text: str
    finish_reason: str  # "stop" or "length" (cut by max_tokens); "error" when the request failed for good
    error: str = ""


@dataclass
class Usage:
    """Teacher traffic, updated from worker threads."""

    requests: int = 0
    retries: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for key, value in counts.items():
                setattr(self, key, getattr(self, key) + value)

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("requests", "retries", "failed", "prompt_tokens", "completion_tokens")}


class Teacher(Protocol):
    name: str
    usage: Usage

    def generate(self, requests: Sequence[Request]) -> list[Reply]:
        """One reply per request, in order; a request that fails for good gives finish_reason 'error'."""
        ...
