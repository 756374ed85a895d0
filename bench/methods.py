"""Every method on the built-in model, same data and step budget: trainable parameters, peak RSS,
tokens/s and the held-out demo score. Each method runs in its own process so peak RSS is its own.

    .venv/bin/python bench/methods.py --steps 20 --out bench/results/methods.json

Prints a markdown table (the README's) and writes the raw numbers as JSON.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

RECIPES = {
    "lora": "recipes/quickstart.yaml",
    "lora (rslora + pissa)": "recipes/lora-rslora-pissa.yaml",
    "lora + neftune": "recipes/neftune.yaml",
    "dora": "recipes/dora.yaml",
    "qlora": "recipes/qlora.yaml",
    "loraplus": "recipes/loraplus.yaml",
    "adalora": "recipes/adalora.yaml",
    "vera": "recipes/vera.yaml",
    "freeze": "recipes/freeze.yaml",
    "full": "recipes/full.yaml",
    "galore": "recipes/galore.yaml",
    "ia3": "recipes/ia3.yaml",
}

CHILD = r"""
import json, resource, sys
from tunesmith.quiet import quiet_libraries
quiet_libraries()
from tunesmith.config import load_config
from tunesmith.training.run import train
from tunesmith.evaluation.run import evaluate
recipe, steps, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
cfg = load_config(recipe, [f"train.max_steps={steps}", f"output_dir={out}"])
run = train(cfg, overwrite=True, progress=False)
train_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
report = evaluate(out, progress=False)
print("RESULT " + json.dumps({**run.summary, "peak_rss_mib": round(train_rss), "score": report["score"],
                              "eval_loss_after": report["eval_loss"]}))
"""


def run_one(recipe: str, steps: int, out: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, recipe, str(steps), out], capture_output=True, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{recipe} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--only", nargs="*", help="method labels to run (default: all)")
    parser.add_argument("--out", default="bench/results/methods.json")
    args = parser.parse_args()
    results = {}
    work = Path(tempfile.mkdtemp(prefix="tunesmith-bench-"))
    for label, recipe in RECIPES.items():
        if args.only and label not in args.only:
            continue
        r = run_one(recipe, args.steps, str(work / label.replace(" ", "_")))
        results[label] = r
        print(f"{label}: {json.dumps({k: r[k] for k in ('trainable_parameters', 'peak_rss_mib', 'tokens_per_second', 'score')})}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\n| method | trainable params | peak RSS (MiB) | tokens/s | held-out score ({args.steps} steps) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for label, r in results.items():
        print(f"| {label} | {r['trainable_parameters']:,} | {r['peak_rss_mib']:,} | {r['tokens_per_second']:.0f} | {r['score']:.0%} |")


if __name__ == "__main__":
    main()
