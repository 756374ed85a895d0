"""The engine: concurrent requests become batched `generate` calls on one model, base and adapters mixed.

Requests wait in a bounded asyncio queue (full: the caller answers 429). A background task takes whatever is
waiting, up to `max_batch` rows, and hands it to one worker thread, which owns the model: the adapters are
applied (adapters.py) and one batched generate runs (batch.py). While it runs, new requests queue up and
form the next batch. Every event a row produces crosses back into the event loop through the request's own
asyncio queue, so a handler simply awaits its events.
"""
from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .adapters import AdapterSet
from .batch import Row, generate_rows
from .protocol import ApiError


@dataclass
class Event:
    index: int  # the row (choice) it belongs to
    delta: str = ""
    finish_reason: str | None = None
    generated: int = 0
    error: str | None = None


@dataclass
class Job:
    """One HTTP request's rows and the queue their events arrive on."""

    rows: list[Row]
    events: asyncio.Queue = field(default_factory=asyncio.Queue)

    def cancel(self) -> None:
        for row in self.rows:
            row.cancelled.set()


class Engine:
    def __init__(self, model, pad_id: int, stop_ids: list[int], max_batch: int = 16, max_queue: int = 64,
                 gather_s: float = 0.005):
        self.model = model
        self.adapters = AdapterSet(model)
        self.pad_id = pad_id
        self.stop_ids = stop_ids
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.gather_s = gather_s  # how long an idle engine waits for more requests before it starts a batch
        self.lock = threading.Lock()  # the tokenizer is not thread-safe: handlers and the worker share this
        self._queue: asyncio.Queue | None = None
        self._carry: list[Job] = []
        self._task: asyncio.Task | None = None
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tunesmith-engine")
        self.batches: list[tuple[int, int]] = []  # (rows, distinct adapter stacks) per generate call

    async def start(self) -> None:
        self._queue = asyncio.Queue(maxsize=self.max_queue)
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._worker.shutdown(wait=True)

    def submit(self, rows: list[Row]) -> Job:
        """Queue a request's rows; a full queue is a 429 the caller can retry."""
        loop = asyncio.get_running_loop()
        job = Job(rows)
        for index, row in enumerate(rows):
            row.on_delta = lambda r, text, i=index: loop.call_soon_threadsafe(job.events.put_nowait, Event(i, delta=text))
            row.on_done = lambda r, i=index: loop.call_soon_threadsafe(
                job.events.put_nowait, Event(i, finish_reason=r.finish_reason, generated=r.generated))
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            raise ApiError(429, f"the server is busy ({self.max_queue} requests waiting); retry shortly",
                           code="queue_full") from None
        return job

    async def _next_batch(self) -> list[Job]:
        jobs = [self._carry.pop(0) if self._carry else await self._queue.get()]
        await self._gather()
        rows = len(jobs[0].rows)
        while rows < self.max_batch and (self._carry or not self._queue.empty()):
            job = self._carry.pop(0) if self._carry else self._queue.get_nowait()
            if rows + len(job.rows) > self.max_batch:
                self._carry.insert(0, job)
                break
            jobs.append(job)
            rows += len(job.rows)
        return jobs

    async def _gather(self) -> None:
        """Requests sent together arrive a few ms apart: wait while they keep coming (at most 10 waits)."""
        for _ in range(10):
            waiting = self._queue.qsize()
            if waiting + 1 >= self.max_batch or not self.gather_s:
                return
            await asyncio.sleep(self.gather_s)
            if self._queue.qsize() == waiting:
                return

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self._next_batch()
            rows = [r for job in jobs for r in job.rows if not r.cancelled.is_set()]
            if rows:
                await loop.run_in_executor(self._worker, self._generate, rows)
            for job in jobs:  # a row that did not finish (its generate failed) ends its request with an error
                for index, row in enumerate(job.rows):
                    if not row.done and not row.cancelled.is_set():
                        job.events.put_nowait(Event(index, error=row.error or "generation failed"))

    def _generate(self, rows: list[Row]) -> None:
        """In the worker thread: one generate per adapter group (one in all when PEFT can mix them)."""
        for group in self.adapters.groups(rows):
            self.batches.append((len(group.rows), len({self.adapters.resolve(r.stack) for r in group.rows})))
            try:
                with group.context:
                    generate_rows(self.model, group.rows, self.pad_id, self.stop_ids, **group.kwargs)
            except Exception as exc:  # one failed batch fails its requests, never the server
                for row in group.rows:
                    row.error = f"generation failed: {type(exc).__name__}: {exc}"
