"""Does grown data help? 16 hand-written seeds of a task the demo does not use, grown with the built-in model as
the teacher, cleaned and selected, then trained on, against training on the seeds alone.

    python bench/datagen_experiment.py              # the README table (19 min on 2 CPU cores)
    python bench/datagen_experiment.py --quick      # a smoke run with tiny budgets: proves the pipeline

The task: rewrite a date written in words ("March 5, 2021", "5 March 2021") as ISO 8601 ("2021-03-05"), scored
by exact match on 40 held-out dates that no seed contains. Pipeline: self-instruct and evol from the seeds with
SmolLM2-135M-Instruct as the teacher (replies capped at --max-tokens so it runs in minutes on a CPU), then dedup
(seeds first, so near-copies of a seed go), filter, and IFD select of the generated rows; the grown training set is
the seeds plus the selected rows. Both trainings use the quickstart LoRA recipe with the same number of steps.
Every file and results.json land in --out.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
DAYS_IN = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
INSTRUCTIONS = [  # the seeds' wordings; the held-out set uses the first
    "Convert the date to ISO 8601 format (YYYY-MM-DD).",
    "Rewrite this date in the YYYY-MM-DD format.",
    "Give the ISO 8601 form of the following date.",
    "Write the date below as year-month-day with two-digit month and day.",
]
SEEDS = [  # (date as written, ISO answer): written by hand
    ("March 5, 2021", "2021-03-05"), ("12 October 1998", "1998-10-12"), ("July 4, 1976", "1976-07-04"),
    ("1 January 2000", "2000-01-01"), ("December 25, 2019", "2019-12-25"), ("30 June 2015", "2015-06-30"),
    ("February 14, 2023", "2023-02-14"), ("9 November 1989", "1989-11-09"), ("August 21, 2017", "2017-08-21"),
    ("3 April 2011", "2011-04-03"), ("September 1, 2005", "2005-09-01"), ("17 May 1990", "1990-05-17"),
    ("January 31, 2024", "2024-01-31"), ("22 February 1984", "1984-02-22"), ("October 8, 2008", "2008-10-08"),
    ("28 July 1995", "1995-07-28"),
]


def written(year: int, month: int, day: int, style: int) -> str:
    return f"{MONTHS[month - 1]} {day}, {year}" if style == 0 else f"{day} {MONTHS[month - 1]} {year}"


def held_out(n: int, seed: int = 7) -> list[tuple[str, str]]:
    """n dates none of the seeds has, half in each written style, with their ISO answers."""
    rng, seen, rows = random.Random(seed), {iso for _, iso in SEEDS}, []
    while len(rows) < n:
        year, month = rng.randint(1950, 2030), rng.randint(1, 12)
        day = rng.randint(1, DAYS_IN[month - 1])
        iso = f"{year:04d}-{month:02d}-{day:02d}"
        if iso not in seen:
            seen.add(iso)
            rows.append((written(year, month, day, len(rows) % 2), iso))
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/datagen-experiment")
    parser.add_argument("--n", type=int, default=24, help="Self-instruct: new instructions.")
    parser.add_argument("--rounds", type=int, default=2, help="Evol-Instruct rounds.")
    parser.add_argument("--max-tokens", type=int, default=160, help="Most tokens per teacher reply.")
    parser.add_argument("--select", type=int, default=32, help="Generated rows kept by select.")
    parser.add_argument("--steps", type=int, default=30, help="LoRA steps of each training.")
    parser.add_argument("--eval", type=int, default=40, help="Held-out examples.")
    parser.add_argument("--quick", action="store_true", help="A smoke run: --n 4 --rounds 1 --steps 4 --eval 8.")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.rounds, args.steps, args.eval, args.select = 4, 1, 4, 8, 8

    sys.path.insert(0, str(REPO / "src"))
    from tunesmith.config import load_config
    from tunesmith.datagen.dedup import DedupOptions, dedup
    from tunesmith.datagen.evol import EvolOptions, evol
    from tunesmith.datagen.filtering import FilterOptions, filter_file
    from tunesmith.datagen.local_teacher import LocalTeacher
    from tunesmith.datagen.selection import SelectOptions, select
    from tunesmith.datagen.self_instruct import SelfInstructOptions, self_instruct
    from tunesmith.evaluation.run import evaluate
    from tunesmith.quiet import quiet_libraries
    from tunesmith.training.run import train as run_train

    quiet_libraries()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    seeds = write_jsonl(out / "seeds.jsonl", [
        {"id": f"seed-{i}", "instruction": INSTRUCTIONS[i % len(INSTRUCTIONS)], "input": text, "output": iso}
        for i, (text, iso) in enumerate(SEEDS)])
    eval_file = write_jsonl(out / "held-out.jsonl", [{"instruction": INSTRUCTIONS[0], "input": text, "output": iso}
                                                     for text, iso in held_out(args.eval)])

    # 1. grow: the built-in model is the teacher (loaded once, shared by both steps and by select)
    teacher = LocalTeacher("smollm2-135m-instruct")
    reports = {}
    t = time.perf_counter()
    reports["self-instruct"] = self_instruct(seeds, out / "self-instruct.jsonl", teacher, SelfInstructOptions(
        n=args.n, max_tokens=args.max_tokens, batch=4)).as_dict()
    print(f"self-instruct: {reports['self-instruct']['rows_out']} rows in {time.perf_counter() - t:.0f} s", flush=True)
    t = time.perf_counter()
    reports["evol"] = evol(seeds, out / "evol.jsonl", teacher, EvolOptions(rounds=args.rounds,
                                                                            max_tokens=args.max_tokens)).as_dict()
    print(f"evol: {reports['evol']['rows_out']} rows in {time.perf_counter() - t:.0f} s", flush=True)

    # 2. clean and select: seeds first in dedup, so a generated near-copy of a seed is the one dropped
    seed_rows = read_jsonl(seeds)
    generated = read_jsonl(out / "self-instruct.jsonl") + read_jsonl(out / "evol.jsonl")
    pool = write_jsonl(out / "pool.jsonl", seed_rows + generated)
    reports["dedup"] = dedup(pool, out / "dedup.jsonl", DedupOptions()).as_dict()
    seed_ids = {r["id"] for r in seed_rows}
    write_jsonl(out / "dedup-generated.jsonl", [r for r in read_jsonl(out / "dedup.jsonl") if r["id"] not in seed_ids])
    reports["filter"] = filter_file(out / "dedup-generated.jsonl", out / "filter.jsonl", FilterOptions(max_tokens=512),
                                    tokenizer=teacher.tokenizer).as_dict()
    reports["select"] = select(out / "filter.jsonl", out / "select.jsonl", SelectOptions(n=args.select),
                               loaded=(teacher.model, teacher.tokenizer)).as_dict()
    grown = write_jsonl(out / "grown.jsonl", seed_rows + read_jsonl(out / "select.jsonl"))
    del teacher
    generation_seconds = time.perf_counter() - started
    print(f"data built in {generation_seconds / 60:.1f} min: {len(read_jsonl(grown))} training rows", flush=True)

    # 3. train on each set with the same steps, score on the held-out dates
    results = {}
    for label, train_file in (("seeds only", seeds), ("seeds + grown", grown)):
        run_dir = out / ("run-" + label.replace(" ", "").replace("+", "-"))
        cfg = load_config(REPO / "recipes/quickstart.yaml", [
            f"data.train={train_file}", f"data.eval={eval_file}", "eval.scorer=exact_match", "eval.max_new_tokens=16",
            f"train.max_steps={args.steps}", f"output_dir={run_dir}", "train.eval_each_epoch=false"])
        t = time.perf_counter()
        run_train(cfg, overwrite=True)
        train_seconds = time.perf_counter() - t
        report = evaluate(str(run_dir), progress=False)
        results[label] = {"rows": len(read_jsonl(train_file)), "score": report["score"],
                          "eval_loss": report["eval_loss"], "train_seconds": round(train_seconds, 1),
                          "samples": report["samples"][:3]}
        print(f"  {label:14s} {results[label]['rows']:3d} rows  exact match {report['score']:.1%}", flush=True)
    base_cfg = out / "base.yaml"  # scoring the untouched model takes a recipe that names the eval data
    base_cfg.write_text(f"model: smollm2-135m-instruct\ndata:\n  train: {seeds}\n  eval: {eval_file}\n"
                        f"eval:\n  scorer: exact_match\n  max_new_tokens: 16\noutput_dir: {out / 'unused'}\n")
    base = evaluate(str(base_cfg), base=True, progress=False)
    results["base model"] = {"rows": 0, "score": base["score"], "eval_loss": base["eval_loss"]}

    total = (time.perf_counter() - started) / 60
    print(f"\n{args.steps} LoRA steps each, {args.eval} held-out dates, teacher smollm2-135m-instruct "
          f"(max {args.max_tokens} tokens per reply); data {generation_seconds / 60:.1f} min, total {total:.1f} min\n")
    print("| training data | rows | held-out exact match | held-out loss |")
    print("| --- | --- | --- | --- |")
    for label in ("base model", "seeds only", "seeds + grown"):
        r = results[label]
        print(f"| {label} | {r['rows']} | {r['score']:.1%} | {r['eval_loss']:.3f} |")
    print("\nsteps:", ", ".join(f"{k} {v['rows_in']} -> {v['rows_out']}" for k, v in reports.items()))
    (out / "results.json").write_text(json.dumps({"args": vars(args), "results": results, "steps": reports,
                                                  "data_minutes": generation_seconds / 60, "total_minutes": total},
                                                 indent=2, default=str) + "\n")
    print(f"results: {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
