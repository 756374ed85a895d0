"""Forgetting: what fine-tuning the built-in model costs its general ability, and what each mitigation buys back.

    python bench/forgetting.py --eval-limit 50      # both README tables (measured: 32 min on 2 idle CPU cores)
    python bench/forgetting.py --steps 2 --eval-limit 2 --general-tokens 256 --ewc-samples 2   # smoke run
                                                    # (measured: 43 min on 2 cores shared with two other jobs)

Table 1, same data and step budget (recipes/quickstart.yaml's 40 steps) for every row: plain LoRA
(quickstart.yaml) vs replay (replay.yaml), self-distillation (distill.yaml), EWC (ewc.yaml) and full
fine-tuning (full.yaml). Each row: the booking task score (json_match, greedy), general perplexity on
held-out Python reference text, base vs fine-tuned, and how the base model's own answers to 32 general
questions fare: their perplexity change and the share still given word for word (`tunesmith eval --forgetting`). The issue's target:
at least one mitigation halves plain LoRA's perplexity rise while keeping >= 95% of its task score.

Table 2, a two-task sequence: booking (continual-task1.yaml, prefix [Booking]), then shopping lists
(tunesmith.demo.shopping, prefix [Shopping]) with
  plain        continual.strategy=merge (task 1 folded into the base, then a new adapter: sequential fine-tuning)
  replay       the same, plus 10% replay of task 1's training data
  progressive  task 1's adapter frozen and active, a new one on top (continual-progressive.yaml)
  progressive + routing   the same model, each task served with its own adapters (`--adapter auto`)
Each row: the accuracy matrix R (after task i, score on task j), average accuracy and backward transfer.

`--task recall` trains table 1's rows on the multi-turn recall task instead (tunesmith.demo.recall: ShareGPT with a
system prompt, exact_match on the last answer), with the same recipes' mitigation settings, so the tuned
settings are checked on a second task shape.

Everything goes under --out (runs, data, results.json); the tables print as Markdown.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
METHODS = {"lora": "quickstart.yaml", "replay": "replay.yaml", "distill": "distill.yaml", "ewc": "ewc.yaml",
           "full": "full.yaml"}
SEQUENCE = ["plain", "replay", "progressive"]


def task_overrides(args) -> list[str]:
    """Table 1 on another task: its data and scorer in place of the recipes' booking task."""
    if args.task == "booking":
        return []
    from tunesmith.demo import recall

    train, held_out = recall.write(Path(args.out) / "data")
    return [f"data.train={train}", f"data.eval={held_out}", "data.format=auto", f"eval.scorer={recall.SCORER}",
            "eval.max_new_tokens=32"]


def overrides(args, name: str, extra: list[str] = ()) -> list[str]:
    out = [f"output_dir={Path(args.out) / name}"]
    if args.steps:
        out.append(f"train.max_steps={args.steps}")
    if args.eval_limit:
        out.append(f"eval.limit={args.eval_limit}")
    if args.general_tokens:
        out.append(f"eval.general_tokens={args.general_tokens}")
    return out + list(extra)


def mitigations(args, log) -> list[dict]:
    from tunesmith.config import load_config
    from tunesmith.evaluation.forgetting import forgetting_report
    from tunesmith.training.run import train

    rows = []
    for name in args.methods:
        extra = [f"regularize.ewc.samples={args.ewc_samples}"] if name == "ewc" and args.ewc_samples else []
        config = load_config(REPO / "recipes" / METHODS[name], overrides(args, name, extra + task_overrides(args)))
        log(f"[{name}] training {config.method.name} ({config.train.max_steps} steps) -> {config.output_dir}")
        start = time.perf_counter()
        run = train(config, overwrite=True, progress=args.progress)
        seconds = time.perf_counter() - start
        report = forgetting_report(str(run.output_dir), progress=args.progress)
        rows.append({"method": name, "train_seconds": round(seconds, 1), "summary": run.summary, **report})
        g = report["general"]
        log(f"[{name}] task {report['task']['score']:.1%}, general perplexity {g['base_perplexity']:.3f} -> "
            f"{g['perplexity']:.3f} ({g['relative_change']:+.1%})")
    return rows


def prefixed_copy(src: Path, dst: Path, prefix: str) -> Path:
    """Alpaca rows with the task prefix on the instruction: the prefix the task-1 run trained with (for replay)."""
    lines = []
    for line in src.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            row["instruction"] = f"{prefix} {row['instruction']}"
            lines.append(json.dumps(row))
    dst.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return dst


def sequence(args, log) -> dict:
    from tunesmith.config import load_config
    from tunesmith.routing import adapters_for_task
    from tunesmith.demo import shopping
    from tunesmith.evaluation.forgetting import sequence_metrics
    from tunesmith.evaluation.run import evaluate_loaded
    from tunesmith.inference import load_for_inference
    from tunesmith.training.run import train

    out = Path(args.out)
    shop_train, shop_eval = shopping.write(out / "data")
    booking_replay = prefixed_copy(REPO / "recipes/data/booking-train.jsonl", out / "data/booking-train-prefixed.jsonl",
                                   "[Booking]")
    task1_cfg = load_config(REPO / "recipes/continual-task1.yaml", overrides(args, "seq-task1"))
    log(f"[sequence] task 1 (booking) -> {task1_cfg.output_dir}")
    run1 = train(task1_cfg, overwrite=True, progress=args.progress).output_dir
    shop_data = [f"data.train={shop_train}", f"data.eval={shop_eval}", f"continual.previous=[{run1}]"]
    plans = {
        "plain": ("continual-merge.yaml", []),
        "replay": ("continual-merge.yaml", ["regularize.replay.ratio=0.1", f"regularize.replay.source={booking_replay}"]),
        "progressive": ("continual-progressive.yaml", []),
    }
    configs = {"task1": load_config(run1 / "config.yaml")}

    def scores(run: Path, route: bool = False) -> list[float]:
        loaded = load_for_inference(str(run))
        row = []
        for task_run, cfg in ((run1, configs["task1"]), (run, load_config(run / "config.yaml"))):
            ctx = adapters_for_task(loaded, task_run) if route else contextlib.nullcontext()
            with ctx:
                row.append(evaluate_loaded(loaded, cfg, None, args.progress)["score"])
        return row

    row1_cache: dict[str, float] = {}
    results = {}
    for name in args.sequence:
        recipe, extra = plans[name]
        config = load_config(REPO / "recipes" / recipe, overrides(args, f"seq-{name}", shop_data + extra))
        log(f"[sequence] task 2 (shopping), {name} -> {config.output_dir}")
        run2 = train(config, overwrite=True, progress=args.progress).output_dir
        if not row1_cache:  # task 1's model on both tasks: the same for every strategy
            loaded1 = load_for_inference(str(run1))
            row1_cache["booking"] = evaluate_loaded(loaded1, configs["task1"], None, args.progress)["score"]
            row1_cache["shopping"] = evaluate_loaded(loaded1, load_config(run2 / "config.yaml"), None, args.progress)["score"]
            del loaded1
        first = [row1_cache["booking"], row1_cache["shopping"]]
        variants = [(name, False)] + ([(f"{name} + routing", True)] if name == "progressive" else [])
        for label, route in variants:
            R = [first, scores(run2, route)]
            results[label] = {"R": R, **sequence_metrics(R), "run": str(run2)}
            log(f"[sequence] {label}: R={R}, average accuracy {results[label]['average_accuracy']:.1%}, "
                f"BWT {results[label]['bwt']:+.1%}")
    return results


def print_tables(mit: list[dict], seq: dict) -> None:
    if mit:
        lora = next((r for r in mit if r["method"] == "lora"), None)
        base_ppl = mit[0]["general"]["base_perplexity"]
        print(f"\nGeneral perplexity of the base model: {base_ppl:.3f} "
              f"({mit[0]['general']['tokens']} tokens of held-out Python reference text)\n")
        print(f"| method | {mit[0]['task'].get('scorer', 'task score')} | general perplexity | change | rise vs plain LoRA | task score vs plain LoRA "
              "| base's answers: perplexity change | same answers | train s |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        lora_rise = (lora["general"]["perplexity"] - base_ppl) if lora else None
        for r in mit:
            g, score = r["general"], r["task"]["score"]
            rise = g["perplexity"] - base_ppl
            vs_rise = f"{rise / lora_rise:.2f}x" if lora and lora_rise and lora_rise > 0 else "-"
            vs_score = f"{score / lora['task']['score']:.0%}" if lora and lora["task"]["score"] > 0 else "-"
            q = r["general_questions"]
            print(f"| {r['method']} | {score:.0%} | {g['perplexity']:.3f} | {g['relative_change']:+.1%} | {vs_rise} | "
                  f"{vs_score} | {q['relative_change']:+.1%} | {q['same_answers']:.0%} | {r['train_seconds']:.0f} |")
        if lora and lora["task"]["score"] == 0:
            print("\ntarget: cannot be judged, plain LoRA scored 0% (too few steps?)")
        elif lora and lora_rise and lora_rise > 0:
            hits = [r["method"] for r in mit if r["method"] not in ("lora", "full")
                    and r["general"]["perplexity"] - base_ppl <= 0.5 * lora_rise
                    and r["task"]["score"] >= 0.95 * lora["task"]["score"]]
            print(f"\ntarget (a mitigation halves the rise and keeps >= 95% of the task score): "
                  f"{'met by ' + ', '.join(hits) if hits else 'not met'}")
    if seq:
        print("\n| task 2 strategy | R (after task 1) | R (after task 2) | average accuracy | BWT |")
        print("| --- | --- | --- | --- | --- |")
        for label, r in seq.items():
            fmt = lambda row: " / ".join(f"{x:.0%}" for x in row)  # noqa: E731
            print(f"| {label} | {fmt(r['R'][0])} | {fmt(r['R'][1])} | {r['average_accuracy']:.1%} | {r['bwt']:+.1%} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None, help="Steps per run (default: each recipe's, 40).")
    parser.add_argument("--eval-limit", type=int, default=None, help="Score only the first N held-out examples.")
    parser.add_argument("--general-tokens", type=int, default=None, help="General-text tokens (default 4096).")
    parser.add_argument("--ewc-samples", type=int, default=None, help="Reference examples for the Fisher (default 64).")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--task", default="booking", choices=["booking", "recall"],
                        help="Table 1's task: booking (the recipes' own) or the multi-turn recall task.")
    parser.add_argument("--sequence", nargs="*", default=SEQUENCE, choices=SEQUENCE)
    parser.add_argument("--out", default="runs/forgetting-bench", help="Runs, data and results.json go here.")
    parser.add_argument("--progress", action="store_true", help="Show progress bars.")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(REPO / "src"))
    from tunesmith.quiet import quiet_libraries

    quiet_libraries()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    log = lambda msg: print(f"{time.perf_counter() - start:7.0f}s  {msg}", flush=True)  # noqa: E731
    mit = mitigations(args, log) if args.methods else []
    seq = sequence(args, log) if args.sequence else {}
    results = {"args": vars(args), "mitigations": mit, "sequence": seq, "seconds": round(time.perf_counter() - start, 1)}
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    print_tables(mit, seq)
    print(f"\nresults: {out / 'results.json'} ({results['seconds'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
