"""`make demo`: the base model's score, a short LoRA run, the fine-tuned score, and the time it took."""
from __future__ import annotations

if __name__ == "__main__":  # before torch loads: the restart with jemalloc preloaded costs no second import of it
    from ..allocator import restart_with_allocator

    restart_with_allocator("tunesmith.demo")

import argparse
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from ..config import load_config
from ..errors import TunesmithError
from ..evaluation.run import evaluate
from ..quiet import quiet_libraries
from ..models import DEFAULT_MODEL, is_builtin_cached, pull_builtin
from ..training.run import TrainResult, train

MARKER = ".tunesmith-demo"


def replaces_own_run(out: Path) -> bool:
    """Whether out holds an earlier demo run to replace; refuse a folder the demo did not write (the user's own run)."""
    if not out.exists():
        return False
    if out.is_dir() and (out / MARKER).is_file():
        return True
    if out.is_dir() and not any(out.iterdir()):
        return False
    raise TunesmithError(f"{out} exists and was not written by the demo, so it stays as it is; move it away, or run "
                         f"the demo into another folder: python -m tunesmith.demo --set output_dir={out}-demo")


def train_demo_run(config, replace: bool) -> TrainResult:
    """Train into the demo's folder and mark it as the demo's, also when training stops halfway (Ctrl-C, error)."""
    out = Path(config.output_dir)
    try:
        return train(config, overwrite=replace)
    finally:
        if out.is_dir():  # absent, empty or the demo's before training: the folder holds no one else's work
            (out / MARKER).write_text("Written by the tunesmith demo (make demo), which replaces this folder "
                                      "when it runs again.\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tunesmith.demo", description=__doc__)
    parser.add_argument("--recipe", default="recipes/quickstart.yaml")
    parser.add_argument("--set", action="append", default=[], help="Override a config key, e.g. train.max_steps=20")
    args = parser.parse_args(argv)
    console = Console()
    quiet_libraries()
    try:
        config = load_config(args.recipe, args.set)
        if not Path(args.recipe).exists():
            raise TunesmithError(f"recipe {args.recipe} not found; run the demo from the repository root")
        replace = replaces_own_run(Path(config.output_dir))  # before any slow step
        if config.model == DEFAULT_MODEL and not is_builtin_cached(DEFAULT_MODEL):
            console.print(f"[bold]0.[/] converting the built-in model {DEFAULT_MODEL} from GGUF once (about 30 s) ...")
            pull_builtin(DEFAULT_MODEL)
        start = time.perf_counter()
        console.print(f"[bold]1.[/] scoring the base model {config.model} on the held-out set ...")
        before = evaluate(args.recipe, base=True)
        console.print(f"   base model: [bold]{before['score']:.0%}[/] {before['scorer']}  "
                      f"(example answer: {before['samples'][0]['prediction'][:80]!r})", highlight=False)
        console.print(f"[bold]2.[/] LoRA fine-tuning (r={config.method.r}) ...")
        run = train_demo_run(config, replace)
        s = run.summary
        console.print(f"   {s['steps']} steps in {s['train_seconds']:.0f} s at {s['tokens_per_second']:.0f} tokens/s, "
                      f"train loss {s['train_loss']:.4f}")
        console.print("[bold]3.[/] scoring the fine-tuned model ...")
        after = evaluate(str(run.output_dir))
        total = time.perf_counter() - start
    except TunesmithError as exc:
        Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        return 1
    console.print(
        f"\n[bold]{before['scorer']} on {after['examples']} held-out examples: "
        f"base {before['score']:.0%} -> fine-tuned {after['score']:.0%}[/]  "
        f"(eval loss {before['eval_loss']:.3f} -> {after['eval_loss']:.3f}; total {total / 60:.1f} min)",
        highlight=False,
    )
    console.print(f"example: {after['samples'][0]['prediction']}", highlight=False)
    console.print(f"try it:  tunesmith chat {run.output_dir} --prompt \"Extract the booking as JSON with the keys name, "
                  "city, date (YYYY-MM-DD) and guests.\\n\\nAnna Berg booked a table for 3 in Oslo on 4 May 2026.\"",
                  highlight=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
