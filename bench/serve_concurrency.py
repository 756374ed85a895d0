"""Aggregate generated tokens/s of `tunesmith serve` at 1, 4 and 16 concurrent clients, on the built-in model.

    python bench/serve_concurrency.py                        # 16 requests of 64 tokens, 1/4/16 clients
    python bench/serve_concurrency.py --requests 32 --max-tokens 32 --clients 1 8 32

The same greedy requests (distinct questions, max_tokens fixed, answers may stop earlier) are sent to a real
server on a local port through the official `openai` client: with 1 client they are served one at a time
(the baseline), with C clients C requests are in flight at once and the engine batches them. Reported per
level: wall time, generated tokens (the `usage` counts), tokens/s, the speed-up over one at a time, and the
batch sizes the engine ran. Every level must return the same answers as one at a time (checked). Run it
alone on the machine (under the shared CPU lock): it measures CPU throughput.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time

import openai

from tunesmith.serving.server import BackgroundServer

MODEL = "smollm2-135m-instruct"
TOPICS = ["the sea", "a lighthouse", "bread", "winter", "a robot", "the moon", "trains", "a garden", "rain",
          "a violin", "mountains", "a library", "coffee", "the desert", "bees", "a city at night"]


def questions(n: int) -> list[str]:
    return [f"Write a short story about {TOPICS[i % len(TOPICS)]}{'' if i < len(TOPICS) else f' (version {i})'}."
            for i in range(n)]


async def run_level(url: str, prompts: list[str], clients: int, max_tokens: int) -> tuple[float, list]:
    """All prompts, `clients` at a time (each client sends its next request when its answer arrives)."""
    todo = list(enumerate(prompts))
    results: list = [None] * len(prompts)

    async def worker():
        while todo:
            i, prompt = todo.pop(0)
            results[i] = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0)

    async with openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=600) as client:
        start = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(clients)])
        return time.perf_counter() - start, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    prompts = questions(args.requests)
    with BackgroundServer(MODEL, max_batch=max(args.clients), max_queue=4 * args.requests) as server:
        engine = server.app.state.serving.engine
        asyncio.run(run_level(server.url, prompts[:2], 2, 4))  # warm-up: first-call allocations, thread pools
        rows, baseline = [], None
        for clients in args.clients:
            engine.batches.clear()
            seconds, results = asyncio.run(run_level(server.url, prompts, clients, args.max_tokens))
            answers = [r.choices[0].message.content for r in results]
            tokens = sum(r.usage.completion_tokens for r in results)
            if baseline is None:
                baseline = {"tps": tokens / seconds, "answers": answers}
            rows.append({"clients": clients, "seconds": round(seconds, 2), "tokens": tokens,
                         "tokens_per_s": round(tokens / seconds, 1),
                         "speedup": round(tokens / seconds / baseline["tps"], 2),
                         "mean_batch": round(sum(b for b, _ in engine.batches) / len(engine.batches), 1),
                         "same_answers": answers == baseline["answers"]})
    print(f"{args.requests} requests, max_tokens {args.max_tokens}, greedy, {MODEL}\n")
    print("| clients | wall s | generated tokens | tokens/s | vs one at a time | mean batch | same answers |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | :---: |")
    for r in rows:
        print(f"| {r['clients']} | {r['seconds']} | {r['tokens']} | {r['tokens_per_s']} | {r['speedup']}x | "
              f"{r['mean_batch']} | {'yes' if r['same_answers'] else 'NO'} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
