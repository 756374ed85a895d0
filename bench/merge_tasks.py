"""Two skills, one model: train a LoRA adapter per task, merge them with every method, score both tasks.

    python bench/merge_tasks.py --eval-limit 50                # the README table (22 min on 2 CPU cores)
    python bench/merge_tasks.py --steps 2 --eval-limit 4      # a smoke run (~5 min): proves the pipeline
    python bench/merge_tasks.py --train-only                   # just the two adapters the merge recipes use

Task A is the demo's booking extraction (recipes/quickstart.yaml, JSON answers, json_match). Task B is
the shopping list (tunesmith.demo.shopping: `item: quantity` lines, exact_match). Both adapters are
trained from the built-in model with the quickstart settings; each recipes/merge-<method>.yaml then
merges them, and every model is scored on both held-out sets by `tunesmith.evaluate` (greedy
generation). The table lists the base, each single adapter (exported with `tunesmith.export`), and each
merge; results.json in the output folder keeps every number.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
METHODS = ["linear", "slerp", "task_arithmetic", "ties", "dare_linear", "dare_ties"]


def task_recipe(out: Path, name: str, model: str, train: Path, eval_: Path, scorer: str, limit: int | None) -> Path:
    """A recipe that scores `model` (a full folder) on one task's held-out set."""
    recipe = {
        "model": model,
        "data": {"train": str(train), "eval": str(eval_), "format": "alpaca", "max_length": 256},
        "eval": {"scorer": scorer, "max_new_tokens": 64, "batch_size": 25, **({"limit": limit} if limit else {})},
        "output_dir": str(out / "unused"),
    }
    path = out / "recipes" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="LoRA steps per task (quickstart: 40).")
    parser.add_argument("--eval-limit", type=int, default=None, help="Score only the first N held-out examples.")
    parser.add_argument("--out", default="runs/merge-tasks", help="Runs, merges and results go here.")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--train-only", action="store_true", help="Train the two adapters and stop.")
    parser.add_argument("--skip-train", action="store_true", help="Reuse adapters already in --out.")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(REPO / "src"))
    # The functions themselves: `tunesmith.train` turns into the subpackage once tunesmith.training.run is imported.
    from tunesmith.config import load_config
    from tunesmith.demo import shopping
    from tunesmith.evaluation.run import evaluate
    from tunesmith.exporting import export
    from tunesmith.merging.run import merge
    from tunesmith.merging.spec import load_merge_spec
    from tunesmith.quiet import quiet_libraries
    from tunesmith.reporting.build import TASK_SCORES_FILE
    from tunesmith.training.run import train as run_train

    quiet_libraries()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    booking_train, booking_eval = REPO / "recipes/data/booking-train.jsonl", REPO / "recipes/data/booking-eval.jsonl"
    shop_train, shop_eval = shopping.write(out / "data")
    tasks = {
        "booking": (booking_train, booking_eval, "json_match"),
        "shopping": (shop_train, shop_eval, shopping.SCORER),
    }
    runs = {name: out / name for name in tasks}

    # 1. one LoRA adapter per task, quickstart settings
    timings: dict[str, float] = {}
    if not args.skip_train:
        for name, (train_file, eval_file, scorer) in tasks.items():
            cfg = load_config(REPO / "recipes/quickstart.yaml", [
                f"data.train={train_file}", f"data.eval={eval_file}", f"eval.scorer={scorer}",
                f"train.max_steps={args.steps}", f"output_dir={runs[name]}",
                "train.eval_each_epoch=false",  # every model is scored below
            ])
            t = time.perf_counter()
            print(f"training the {name} adapter ({args.steps} steps) ...", flush=True)
            run_train(cfg, overwrite=True)
            timings[f"train {name}"] = time.perf_counter() - t
    if args.train_only:
        print(f"adapters in {runs['booking']} and {runs['shopping']}")
        return 0

    # 2. the models to score: base, each adapter alone (exported), each merge recipe
    models: dict[str, str] = {"base smollm2-135m-instruct": "smollm2-135m-instruct"}
    for name, run in runs.items():
        folder = out / "single" / name
        export(str(run), str(folder), overwrite=True)
        models[f"{name} adapter alone"] = str(folder)
    for method in args.methods:
        spec = load_merge_spec(REPO / f"recipes/merge-{method}.yaml")
        for entry in spec.models:  # the recipes name runs/merge-tasks/<task>; point them at --out
            entry.model = str(runs[Path(entry.model).name])
        t = time.perf_counter()
        folder = merge(spec, out / "merged" / method, overwrite=True, progress=False)
        timings[f"merge {method}"] = time.perf_counter() - t
        models[f"merge: {method}"] = str(folder)

    # 3. score every model on both tasks
    results: dict[str, dict[str, float]] = {}
    for label, model in models.items():
        results[label] = {}
        for task, (train_file, eval_file, scorer) in tasks.items():
            recipe = task_recipe(out, f"{task}-{label.replace(' ', '_').replace(':', '')}", model, train_file,
                                 eval_file, scorer, args.eval_limit)
            report = evaluate(str(recipe), base=True, progress=False)
            results[label][task] = report["score"]
            results[label][f"{task}_examples"] = report["examples"]
            print(f"  {label:32s} {task:9s} {report['score']:.0%}", flush=True)

    for method in args.methods:  # each merged folder keeps its own scores: `tunesmith report` shows them
        label = f"merge: {method}"
        scores = {task: {"scorer": tasks[task][2], "score": results[label][task],
                         "examples": results[label][f"{task}_examples"],
                         "alone": results[f"{task} adapter alone"][task]} for task in tasks}
        (out / "merged" / method / TASK_SCORES_FILE).write_text(json.dumps(scores, indent=2) + "\n")

    n = next(iter(results.values()))["booking_examples"]
    print(f"\n{args.steps} LoRA steps per task, {n} held-out examples per task "
          f"(total {(time.perf_counter() - started) / 60:.1f} min)\n")
    print("| model | booking (json_match) | shopping (exact_match) | mean |")
    print("| --- | --- | --- | --- |")
    for label, r in results.items():
        print(f"| {label} | {r['booking']:.0%} | {r['shopping']:.0%} | {(r['booking'] + r['shopping']) / 2:.0%} |")
    (out / "results.json").write_text(json.dumps({"steps": args.steps, "eval_limit": args.eval_limit,
                                                  "scores": results, "seconds": timings}, indent=2) + "\n")
    print(f"\nresults: {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
