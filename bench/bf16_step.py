"""bf16 autocast against fp32 for one training step of the built-in model on this CPU (what `train.bf16: auto`
decides from): forward + backward of all weights, and forward alone, alternating, side by side.

    .venv/bin/python bench/bf16_step.py --reps 3

Prints tokens/s for each and the bf16/fp32 ratio, and whether the CPU has AMX tiles (the flag `auto` reads).
Run it alone: a second torch process on these cores distorts every number.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def tokens_per_second(model, ids: torch.Tensor, bf16: bool, backward: bool) -> float:
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), torch.set_grad_enabled(backward):
        loss = model(input_ids=ids, labels=ids).loss
    if backward:
        loss.backward()
        model.zero_grad(set_to_none=True)
    return ids.numel() / (time.perf_counter() - start)


def main() -> None:
    from tunesmith.device import bf16_supported
    from tunesmith.models import load_model
    from tunesmith.quiet import quiet_libraries

    quiet_libraries()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=120)
    args = p.parse_args()
    model = load_model("smollm2-135m-instruct").train()
    model.config.use_cache = False
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    results = {}
    for backward in (True, False):
        for bf16 in (False, True):  # one warm-up each: first calls pay for kernel selection
            tokens_per_second(model, ids, bf16, backward)
        runs = {False: [], True: []}
        for _ in range(args.reps):
            for bf16 in (False, True):
                runs[bf16].append(tokens_per_second(model, ids, bf16, backward))
        results["train step" if backward else "forward only"] = {k: statistics.median(v) for k, v in runs.items()}
    print(f"AMX tiles (train.bf16: auto turns bf16 on): {bf16_supported()}")
    print(f"{args.batch} x {args.seq} tokens, median of {args.reps} alternating reps")
    print("| | fp32 tokens/s | bf16 autocast tokens/s | bf16 / fp32 |\n| --- | ---: | ---: | ---: |")
    for name, r in results.items():
        print(f"| {name} | {r[False]:.0f} | {r[True]:.0f} | {r[True] / r[False]:.2f} |")


if __name__ == "__main__":
    main()
