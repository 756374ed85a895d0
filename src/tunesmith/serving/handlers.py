"""The handlers behind the routes: OpenAI requests in, engine rows out, OpenAI responses (or SSE chunks) back.

Chat prompts are built the way `tunesmith chat` and `eval` build them: the model's task prefix on the first
user message (routing.py), the run's system prompt when the request has none (as training added it), the
run's chat template; answers are stripped like theirs, so the same prompt and settings give the same text.
Text completions take the prompt as given (no template, no prefix) and return the continuation unstripped.
"""
from __future__ import annotations

from typing import AsyncIterator

from ..data.templates import render
from ..errors import TunesmithError
from ..routing import first_user_text
from .batch import Row, Sampling
from .decoding import AnswerText
from .engine import Engine, Job
from .protocol import (
    ApiError, AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, ChunkChoice,
    Completion, CompletionChoice, CompletionRequest, Delta, ModelCard, ModelList, SamplingRequest, new_id, usage,
)
from .registry import Registry, ServedModel

DONE = "data: [DONE]\n\n"


def sse(obj) -> str:
    return f"data: {obj.model_dump_json()}\n\n"


class Serving:
    def __init__(self, tokenizer, engine: Engine, registry: Registry, context: int):
        self.tokenizer = tokenizer
        self.engine = engine
        self.registry = registry
        self.context = context  # the model's context window, in tokens

    # ---- building rows -----------------------------------------------------------------------------------

    def _encode(self, text: str, special: bool) -> list[int]:
        with self.engine.lock:
            return self.tokenizer(text, add_special_tokens=special)["input_ids"]

    def _decode(self, ids: list[int]) -> str:
        with self.engine.lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _max_tokens(self, req: SamplingRequest, prompt_tokens: int) -> int:
        room = self.context - prompt_tokens
        if room < 1:
            raise ApiError(400, f"the prompt is {prompt_tokens} tokens; this model's context is {self.context} tokens: "
                                "shorten the messages", param="messages", code="context_length_exceeded")
        wanted = req.token_limit()
        if wanted is not None and wanted > room:
            raise ApiError(400, f"max_tokens {wanted} plus the prompt's {prompt_tokens} tokens exceed this model's "
                                f"context of {self.context} tokens: ask for at most {room}", param="max_tokens",
                           code="context_length_exceeded")
        return wanted if wanted is not None else room

    def _rows(self, req: SamplingRequest, ids: list[int], served: ServedModel, strip: bool) -> list[Row]:
        if req.n > self.engine.max_batch:
            raise ApiError(400, f"n {req.n}: this server generates at most {self.engine.max_batch} answers at once",
                           param="n")
        limit = self._max_tokens(req, len(ids))
        return [Row(ids, served.stack, limit,
                    Sampling(req.temperature, req.top_p, None if req.seed is None else req.seed + i),
                    AnswerText(self._decode, req.stops(), strip))
                for i in range(req.n)]

    def chat_prompt(self, req: ChatCompletionRequest) -> tuple[ServedModel, str]:
        """(what serves it, the rendered prompt) for a chat request, as `tunesmith chat` would build it."""
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        served, add_prefix = self.registry.pick(req.model, first_user_text(messages))
        if add_prefix and served.route is not None:
            first = next((m for m in messages if m["role"] == "user"), None)
            if first is not None:
                first["content"] = served.route.prefixed(first["content"])
        if served.system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": served.system_prompt})
        try:
            return served, render(self.tokenizer, messages, add_generation_prompt=True)
        except TunesmithError as exc:
            raise ApiError(400, str(exc), param="messages") from None

    # ---- endpoints -------------------------------------------------------------------------------------------

    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=name) for name in self.registry.ids()])

    async def chat(self, req: ChatCompletionRequest):
        served, prompt = self.chat_prompt(req)
        ids = self._encode(prompt, special=False)
        rows = self._rows(req, ids, served, strip=True)
        job = self.engine.submit(rows)
        if req.stream:
            return self._chat_stream(req, job, len(ids))
        await _finished(job)
        choices = [ChatChoice(index=i, message=AssistantMessage(content=r.text.text), finish_reason=r.finish_reason)
                   for i, r in enumerate(rows)]
        return ChatCompletion(id=new_id("chatcmpl"), model=req.model, choices=choices,
                              usage=usage(len(ids), sum(r.generated for r in rows)))

    async def _chat_stream(self, req: ChatCompletionRequest, job: Job, prompt_tokens: int) -> AsyncIterator[str]:
        cid = new_id("chatcmpl")

        def chunk(choices, **extra) -> str:
            return sse(ChatCompletionChunk(id=cid, model=req.model, choices=choices, **extra))

        try:
            yield chunk([ChunkChoice(index=i, delta=Delta(role="assistant", content="")) for i in range(len(job.rows))])
            async for event in _events(job):
                if event.error:
                    yield _error_chunk(event.error)
                    break
                if event.delta:
                    yield chunk([ChunkChoice(index=event.index, delta=Delta(content=event.delta))])
                if event.finish_reason:
                    yield chunk([ChunkChoice(index=event.index, delta=Delta(), finish_reason=event.finish_reason)])
            else:
                if req.stream_options and req.stream_options.include_usage:
                    yield chunk([], usage=usage(prompt_tokens, sum(r.generated for r in job.rows)))
            yield DONE
        finally:
            job.cancel()  # a client that disconnects stops its rows; a finished job is unaffected

    async def completions(self, req: CompletionRequest):
        rows, prompt_tokens = [], 0
        for prompt in req.prompts():
            served, _ = self.registry.pick(req.model, prompt)
            ids = self._encode(prompt, special=True)
            prompt_tokens += len(ids)
            rows.extend(self._rows(req, ids, served, strip=False))
        job = self.engine.submit(rows)
        if req.stream:
            return self._completion_stream(req, job, prompt_tokens)
        await _finished(job)
        choices = [CompletionChoice(index=i, text=r.text.text, finish_reason=r.finish_reason) for i, r in enumerate(rows)]
        return Completion(id=new_id("cmpl"), model=req.model, choices=choices,
                          usage=usage(prompt_tokens, sum(r.generated for r in rows)))

    async def _completion_stream(self, req: CompletionRequest, job: Job, prompt_tokens: int) -> AsyncIterator[str]:
        cid = new_id("cmpl")
        try:
            async for event in _events(job):
                if event.error:
                    yield _error_chunk(event.error)
                    break
                if event.delta or event.finish_reason:
                    yield sse(Completion(id=cid, model=req.model, choices=[
                        CompletionChoice(index=event.index, text=event.delta, finish_reason=event.finish_reason)]))
            else:
                if req.stream_options and req.stream_options.include_usage:
                    yield sse(Completion(id=cid, model=req.model, choices=[],
                                         usage=usage(prompt_tokens, sum(r.generated for r in job.rows))))
            yield DONE
        finally:
            job.cancel()


async def _events(job: Job):
    """The job's events until every row has finished (or one failed)."""
    left = len(job.rows)
    while left:
        event = await job.events.get()
        yield event
        if event.error:
            return
        if event.finish_reason:
            left -= 1


async def _finished(job: Job) -> None:
    try:
        async for event in _events(job):
            if event.error:
                raise ApiError(500, event.error)
    finally:
        job.cancel()


def _error_chunk(message: str) -> str:
    return sse(ApiError(500, message).body)
