"""Evaluation-guided merging on the booking + shopping pair (or with the multi-turn recall task as a third): the
best merge against each adapter alone.

    python bench/merge_search.py                         # ~15 min on 2 CPU cores (both adapters already trained)
    python bench/merge_search.py --tasks booking shopping recall --grid method=linear,task_arithmetic,ties
    python bench/merge_search.py --multitask-steps 0     # without the multi-task upper bound
    python bench/merge_search.py --val-rows 4 --held-out 8 --grid method=linear   # a smoke run

The booking adapter is a run of recipes/quickstart.yaml (`--booking`, default runs/quickstart; trained into
--out if missing), the shopping adapter the same recipe on tunesmith.demo.shopping (trained into --out if
missing), as bench/merge_tasks.py trains them; the recall adapter (`--tasks ... recall`) the same recipe on
tunesmith.demo.recall's ShareGPT rows (`--recall`, default --out/recall). `tunesmith.merging.search` then scores the default grid on
the first --val-rows held-out rows of each task and reports the winner on the next --held-out rows. The
multi-task row trains one adapter on both training sets at once (the upper bound a merge tries to reach;
by default as many steps as the two adapters together); the routing row is each task served by its own
adapter, what `--adapter auto` serves when every prompt carries its task's prefix. Results go to
--out/results.json and the search folder (--out/merged: search.md, task_scores.json, diagnosis.json).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def task_recipe(out: Path, name: str, train: Path, eval_: Path, scorer: str, held_out: int) -> Path:
    """The recipe that says how to score one task (its eval set and scorer); its model is not used."""
    recipe = {
        "model": "smollm2-135m-instruct",
        "data": {"train": str(train), "eval": str(eval_), "format": "auto", "max_length": 256},
        "eval": {"scorer": scorer, "max_new_tokens": 64, "batch_size": 25, "limit": held_out},
        "output_dir": str(out / "unused"),
    }
    path = out / "tasks" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/merge-search")
    parser.add_argument("--booking", default="runs/quickstart", help="The booking adapter's run folder.")
    parser.add_argument("--shopping", default=None, help="The shopping adapter's run folder (default: --out/shopping).")
    parser.add_argument("--recall", default=None, help="The recall adapter's run folder (default: --out/recall).")
    parser.add_argument("--tasks", nargs="+", default=["booking", "shopping"], choices=["booking", "shopping", "recall"],
                        help="The tasks (and their adapters) to merge; the first two are the default.")
    parser.add_argument("--steps", type=int, default=40, help="LoRA steps of an adapter trained here.")
    parser.add_argument("--val-rows", type=int, default=20)
    parser.add_argument("--held-out", type=int, default=50, help="Held-out rows per task after the validation slice.")
    parser.add_argument("--grid", nargs="*", default=[], help="KEY=V1,V2 overrides of the default grid.")
    parser.add_argument("--multitask-steps", type=int, default=80, help="0 skips the multi-task run.")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(REPO / "src"))
    from tunesmith.config import load_config
    from tunesmith.demo import recall, shopping
    from tunesmith.inference import load_for_inference
    from tunesmith.merging.search import explain, generation_score, load_task, parse_grid, search, verdict
    from tunesmith.quiet import quiet_libraries
    from tunesmith.rundir import is_run_dir
    from tunesmith.training.run import train as run_train

    quiet_libraries()
    started = time.perf_counter()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    booking = (REPO / "recipes/data/booking-train.jsonl", REPO / "recipes/data/booking-eval.jsonl", "json_match")
    shop_train, shop_eval = shopping.write(out / "data")
    recall_train, recall_eval = recall.write(out / "data")
    every = {"booking": booking, "shopping": (shop_train, shop_eval, shopping.SCORER),
             "recall": (recall_train, recall_eval, recall.SCORER)}
    tasks = {name: every[name] for name in args.tasks}
    folders = {"booking": args.booking, "shopping": args.shopping or out / "shopping", "recall": args.recall or out / "recall"}
    runs = {name: Path(folders[name]).resolve() for name in tasks}
    timings: dict[str, float] = {}

    def train(name: str, train_files, eval_files, scorer: str, steps: int, run: Path) -> None:
        cfg = load_config(REPO / "recipes/quickstart.yaml", [
            f"data.train={json.dumps([str(f) for f in train_files])}", f"data.eval={json.dumps([str(f) for f in eval_files])}",
            "data.format=auto", f"eval.scorer={scorer}", f"train.max_steps={steps}", f"output_dir={run}", "train.eval_each_epoch=false"])
        print(f"training {name} ({steps} steps) ...", flush=True)
        t = time.perf_counter()
        run_train(cfg, overwrite=True)
        timings[f"train {name}"] = round(time.perf_counter() - t, 1)

    for name, run in runs.items():
        if not is_run_dir(run):
            train_file, eval_file, scorer = tasks[name]
            train(name, [train_file], [eval_file], scorer, args.steps, run)

    recipes = [task_recipe(out, name, *files, args.held_out) for name, files in tasks.items()]
    spec = {"method": "linear", "base_model": "smollm2-135m-instruct", "models": [str(runs[t]) for t in tasks]}

    def row(r: dict) -> None:
        print(f"  {r['candidate']:40s} " + "  ".join(f"{t} {s:.0%}" for t, s in r["scores"].items())
              + f"  worst share {r['worst']:.0%}  ({r['seconds']:.0f} s)", flush=True)

    t = time.perf_counter()
    result = search(spec, recipes, out / "merged", grid=parse_grid(args.grid, len(tasks)), val_rows=args.val_rows,
                    overwrite=True, progress=False, on_row=row)
    timings["search"] = round(time.perf_counter() - t, 1)
    print(verdict(result), flush=True)
    for line in explain(result.diagnosis):
        print(f"  {line}")

    held = result.held_out
    table = {
        f"{name} adapter alone": {t: held[t]["singles"][str(runs[name])] for t in tasks} for name in tasks
    }
    table["routing by task prefix (each task served by its own adapter)"] = {t: held[t]["singles"][str(runs[t])]
                                                                             for t in tasks}
    table[f"best merge: {result.winner.label()}"] = {t: held[t]["score"] for t in tasks}
    if args.multitask_steps:
        run = out / "multitask"
        train("multi-task", [f[0] for f in tasks.values()], [f[1] for f in tasks.values()], "exact_match",
              args.multitask_steps, run)
        loaded = load_for_inference(str(run))
        t = time.perf_counter()
        table[f"multi-task LoRA ({args.multitask_steps} steps on {'both' if len(tasks) == 2 else 'all'})"] = {
            task.name: generation_score(loaded.model, loaded.tokenizer, task, task.held_out)
            for task in (load_task(r, args.val_rows) for r in recipes)}
        timings["score multi-task"] = round(time.perf_counter() - t, 1)

    n = next(iter(held.values()))["examples"]
    print(f"\n{len(result.rows)} candidates chosen on {args.val_rows} validation rows per task; scores on the next "
          f"{n} held-out rows (total {(time.perf_counter() - started) / 60:.1f} min)\n")
    print("| model | " + " | ".join(f"{t} ({files[2]})" for t, files in tasks.items()) + " | worst share of alone |")
    print("| --- |" + " ---: |" * (len(tasks) + 1))
    alone = {t: held[t]["alone"] for t in tasks}
    for label, scores in table.items():
        share = min(scores[t] / alone[t] if alone[t] else 1.0 for t in tasks)
        print(f"| {label} | " + " | ".join(f"{scores[t]:.0%}" for t in tasks) + f" | {share:.0%} |")
    (out / "results.json").write_text(json.dumps({
        "val_rows": args.val_rows, "held_out": n, "winner": result.winner.label(), "reached": result.reached,
        "table": table, "seconds": timings}, indent=2) + "\n")
    print(f"\nresults: {out / 'results.json'}; every candidate: {out / 'merged' / 'search.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
