"""`--parallel N`: N runs at once, each in its own worker process, for machines with more than one run's worth of
accelerator. Worker i sees only GPU i mod (GPUs), through CUDA_VISIBLE_DEVICES set before it touches CUDA.

`finished_in_any_order` is the scheduling: jobs start as workers free up; a failure cancels the jobs not yet
started, lets the running ones finish (their results still come out, so they are recorded), then is raised.
"""
from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import CancelledError, Executor, Future, ProcessPoolExecutor, as_completed
from typing import Callable, Iterable, Iterator, Optional, TypeVar

J = TypeVar("J")
R = TypeVar("R")


def device_slots(workers: int, gpus: int) -> list[Optional[str]]:
    """CUDA_VISIBLE_DEVICES for each worker: GPUs shared round-robin; None (leave it alone) without GPUs."""
    if gpus < 1:
        return [None] * workers
    return [str(i % gpus) for i in range(workers)]


def take_slot(slots) -> None:
    """Pool initializer: this worker's device, taken from the shared queue before anything loads CUDA."""
    slot = slots.get()
    if slot is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = slot


def process_pool(workers: int, gpus: int) -> ProcessPoolExecutor:
    """Fresh interpreters (spawn): a forked copy of a process that has started CUDA or threads is not safe."""
    context = multiprocessing.get_context("spawn")
    slots = context.Queue()
    for slot in device_slots(workers, gpus):
        slots.put(slot)
    return ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=take_slot, initargs=(slots,))


def finished_in_any_order(pool: Executor, run: Callable[[J], R], jobs: Iterable[J]) -> Iterator[tuple[J, R]]:
    """(job, result) as each job finishes; on the first failure the rest are handled as the module says."""
    futures: dict[Future, J] = {pool.submit(run, job): job for job in jobs}
    failure: Optional[BaseException] = None
    try:
        for future in as_completed(futures):
            try:
                result = future.result()
            except CancelledError:
                continue
            except BaseException as exc:
                if failure is None:
                    failure = exc
                    for other in futures:
                        other.cancel()
                continue
            yield futures[future], result
    finally:
        for other in futures:
            other.cancel()
    if failure is not None:
        raise failure
