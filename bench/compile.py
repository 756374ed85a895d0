"""`train.compile` on and off: the default quickstart run (micro batch 4 x accumulation 4), each in its own
process, alternating. Prints the whole training time (compile included), the first optimizer step's time (where
the compiling happens) and tokens/s over the later steps.

    .venv/bin/python bench/compile.py --steps 8
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = r'''
import json, sys, time
from tunesmith.quiet import quiet_libraries
quiet_libraries()
from tunesmith.config import load_config
from tunesmith.training import callbacks, run
ends = []
callbacks.ProgressCallback.on_step_end = lambda self, *a, **k: ends.append(time.perf_counter())
steps = int(sys.argv[1])
cfg = load_config("recipes/quickstart.yaml", [f"train.max_steps={steps}", "train.batch_size=4", "train.grad_accum=4",
    "output_dir=/tmp/bench-compile", "train.eval_each_epoch=false", "train.order=sequential", "train.save_steps=1000",
    f"train.compile={sys.argv[2]}"])
cfg.data.eval = None
cfg.data.eval_split = 0.0
start = time.perf_counter()
s = run.train(cfg, overwrite=True, progress=False).summary
first = ends[0] - start
later_tokens = s["tokens_seen"] * (steps - 1) / steps  # sequential order: steps carry about equal tokens
print("RESULT " + json.dumps({"train_seconds": s["train_seconds"], "first_step_seconds": first,
      "later_tokens_per_second": later_tokens / (ends[-1] - ends[0])}))
'''


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--reps", type=int, default=1)
    args = p.parse_args()
    results = {"false": [], "true": []}
    for rep in range(args.reps):
        for setting in (["false", "true"] if rep % 2 == 0 else ["true", "false"]):
            out = subprocess.run([sys.executable, "-c", CHILD, str(args.steps), setting], capture_output=True, text=True)
            line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
            if out.returncode or not line:
                raise SystemExit(out.stderr[-4000:])
            results[setting].append(json.loads(line[-1][7:]))
            print(f"rep {rep} compile={setting}: {results[setting][-1]}", flush=True)
    for setting, rs in results.items():
        print(f"compile={setting:5s} train {statistics.median(r['train_seconds'] for r in rs):6.1f} s, first step "
              f"{statistics.median(r['first_step_seconds'] for r in rs):6.1f} s, later steps "
              f"{statistics.median(r['later_tokens_per_second'] for r in rs):6.1f} tok/s")


if __name__ == "__main__":
    main()
