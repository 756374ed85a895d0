"""Which teacher `--teacher` names, built only after a step has checked its files."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from ..errors import TunesmithError
from .openai_teacher import OpenAITeacher
from .teacher import DEFAULT_LOCAL_TEACHER, Teacher


@dataclass(frozen=True)
class TeacherSpec:
    """What `--teacher`, `--model`, `--key-env` name: an http(s) URL is an endpoint, anything else a model
    reference for a local teacher (a built-in name, a folder, a hub id)."""

    teacher: str = DEFAULT_LOCAL_TEACHER
    model: Optional[str] = None
    key_env: Optional[str] = None
    concurrency: int = 4
    retries: int = 5
    timeout: float = 120.0
    backoff: float = 1.0

    @property
    def is_endpoint(self) -> bool:
        return self.teacher.startswith(("http://", "https://"))


def as_teacher(teacher: "Teacher | TeacherSpec") -> Teacher:
    """Steps take a spec so that they check their files before a model is loaded or a server is asked."""
    return make_teacher(teacher) if isinstance(teacher, TeacherSpec) else teacher


def make_teacher(spec: TeacherSpec) -> Teacher:
    if spec.concurrency < 1:
        raise TunesmithError(f"--concurrency must be at least 1, got {spec.concurrency}")
    if spec.is_endpoint:
        return OpenAITeacher(spec.teacher, model=spec.model, api_key=_api_key(spec), concurrency=spec.concurrency,
                             retries=spec.retries, timeout=spec.timeout, backoff=spec.backoff)
    if spec.key_env:
        raise TunesmithError(f"--key-env is for endpoint teachers (http://...), but --teacher '{spec.teacher}' is a "
                             "local model; drop --key-env")
    from .local_teacher import LocalTeacher  # torch and transformers only for a local teacher

    return LocalTeacher(spec.teacher)


def _api_key(spec: TeacherSpec) -> str:
    """The key from the named environment variable; without --key-env, OPENAI_API_KEY or a placeholder that
    local servers (tunesmith serve, vLLM, Ollama, llama.cpp) accept."""
    if spec.key_env:
        key = os.environ.get(spec.key_env)
        if not key:
            raise TunesmithError(f"--key-env {spec.key_env}: the environment variable {spec.key_env} is not set; "
                                 f"export {spec.key_env}=<your key> first")
        return key
    return os.environ.get("OPENAI_API_KEY") or "no-key"
