"""Greedy generation for `tunesmith eval`: tunesmith's decoder against transformers' `model.generate`, side by side.

    .venv/bin/python bench/generation.py --reps 2

The model is loaded as `tunesmith eval RUN` loads it (the fp32 built-in base under the run's LoRA adapter,
PEFT); the prompts are the quickstart recipe's held-out set rendered as eval renders them, in eval's batches
(`eval.batch_size`, `eval.max_new_tokens`). Both paths get the same prompts and batch size, alternating rep by
rep in one process: `model.generate(do_sample=False)` with the stop tokens on eval's batches as they come, and
`tunesmith.inference.answer_tokens` (behind `generate_answers`, what eval calls; it regroups by length). Prints generated tokens/s (answer tokens up to each stop token: what eval keeps), seconds per
pass over the eval set, their ratio, and whether every answer is identical token for token (exit status 1 if
not).

The adapter is a run folder (`--run`); without one the quickstart recipe is trained into it first (~3 min).
Run it alone: a second torch process on these cores distorts every number.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_RUN = REPO / "runs" / "bench-generation-quickstart"


def transformers_rows(model, tokenizer, enc, max_new_tokens: int, stops: list[int]) -> list[list[int]]:
    """`model.generate`'s new tokens per row, cut after the first stop token (it pads the rest)."""
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                         pad_token_id=tokenizer.pad_token_id)
    rows = out[:, enc["input_ids"].shape[1]:].tolist()
    return [row[: next((i + 1 for i, t in enumerate(row) if t in stops), len(row))] for row in rows]


def one_pass(path: str, model, tokenizer, prompts: list[str], batch_size: int, max_new_tokens: int,
             stops: list[int]):
    """(seconds, every prompt's answer tokens) for the whole eval set, as `path` generates it."""
    import torch

    from tunesmith.inference import answer_tokens, left_padded

    start = time.perf_counter()
    with torch.inference_mode():
        if path == "tunesmith":  # what eval calls
            rows = answer_tokens(model, tokenizer, prompts, max_new_tokens, batch_size)
        else:  # eval's batches as they come, left-padded
            rows = []
            for i in range(0, len(prompts), batch_size):
                ids = tokenizer(prompts[i : i + batch_size], add_special_tokens=False)["input_ids"]
                input_ids, mask = left_padded(ids, tokenizer.pad_token_id)
                enc = {"input_ids": input_ids, "attention_mask": mask}
                rows.extend(transformers_rows(model, tokenizer, enc, max_new_tokens, stops))
    return time.perf_counter() - start, rows


def eval_prompts(loaded, limit: int | None) -> list[str]:
    """The eval prompts rendered exactly as `tunesmith eval` renders them."""
    from tunesmith.data.assemble import eval_conversations
    from tunesmith.data.templates import render

    convs = eval_conversations(loaded.config)[:limit]
    return [render(loaded.tokenizer, conv[:-1], add_generation_prompt=True, where=where) for conv, where in convs]


def ensure_run(run: Path) -> None:
    from tunesmith.config import load_config
    from tunesmith.rundir import is_run_dir
    from tunesmith.training.run import train

    if not is_run_dir(run):
        print(f"training recipes/quickstart.yaml into {run} (once)")
        train(load_config(REPO / "recipes" / "quickstart.yaml", [f"output_dir={run}"]), progress=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, default=DEFAULT_RUN, help="A quickstart run folder (trained if missing).")
    p.add_argument("--reps", type=int, default=2, help="Passes over the eval set per path, alternating.")
    p.add_argument("--limit", type=int, default=None, help="Only the first N eval examples.")
    p.add_argument("--json", type=Path, default=None, help="Also write the numbers here.")
    args = p.parse_args()

    from tunesmith.inference import load_for_inference, stop_token_ids
    from tunesmith.quiet import quiet_libraries

    quiet_libraries()
    ensure_run(args.run)
    loaded = load_for_inference(str(args.run))
    model, tokenizer, config = loaded.model, loaded.tokenizer, loaded.config
    prompts = eval_prompts(loaded, args.limit)
    stops, max_new, size = stop_token_ids(tokenizer), config.eval.max_new_tokens, config.eval.batch_size
    paths = ["transformers generate", "tunesmith"]
    for name in paths:  # warm-up: first calls pick kernels
        one_pass(name, model, tokenizer, prompts[:size], size, 4, stops)
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    rows: dict[str, list] = {}
    for _ in range(args.reps):
        for name in paths:
            took, rows[name] = one_pass(name, model, tokenizer, prompts, size, max_new, stops)
            seconds[name].append(took)
    identical = rows["tunesmith"] == rows["transformers generate"]
    tokens = sum(len(r) for r in rows["transformers generate"])
    median = {name: statistics.median(s) for name, s in seconds.items()}
    print(f"{len(prompts)} prompts of {args.run} in batches of {config.eval.batch_size}, max_new_tokens {max_new}, "
          f"{tokens} answer tokens; median of {args.reps} alternating reps")
    print("| | seconds per eval | generated tokens/s |\n| --- | ---: | ---: |")
    for name, s in median.items():
        print(f"| {name} | {s:.1f} | {tokens / s:.1f} |")
    ratio = median["transformers generate"] / median["tunesmith"]
    print(f"tunesmith / transformers: {ratio:.2f}x; identical answers: {identical}")
    if not identical:
        differ = [i for i, (a, b) in enumerate(zip(rows["tunesmith"], rows["transformers generate"])) if a != b]
        print(f"rows that differ: {differ}")
    if args.json:
        args.json.write_text(json.dumps({"seconds": seconds, "tokens": tokens, "ratio": ratio,
                                         "identical": identical}, indent=1))
    if not identical:
        raise SystemExit(1)  # a speed-up that changes an answer is a bug, whatever the ratio


if __name__ == "__main__":
    main()
