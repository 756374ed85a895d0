"""The default quickstart run (3 optimizer steps of 4 x 4) under glibc's malloc, jemalloc and tcmalloc, each in its
own process, alternating, `--reps` times each: tokens/s and peak RSS. The allocator is what `tunesmith`
preloads (src/tunesmith/allocator.py); a library the machine lacks is left out.

    .venv/bin/python bench/allocator.py --reps 2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from tunesmith.allocator import find_allocator, search_dirs

CHILD = r'''
import json, resource
from tunesmith.quiet import quiet_libraries
quiet_libraries()
from tunesmith.config import load_config
from tunesmith.training.run import train
cfg = load_config("recipes/quickstart.yaml", ["train.max_steps=3", "train.batch_size=4", "train.grad_accum=4",
    "output_dir=/tmp/bench-allocator", "train.eval_each_epoch=false", "train.order=sequential", "train.save_steps=1000"])
cfg.data.eval = None
cfg.data.eval_split = 0.0
s = train(cfg, overwrite=True, progress=False).summary
print("RESULT " + json.dumps({"tps": s["tokens_per_second"], "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
'''


def contenders() -> dict[str, dict]:
    found = {"glibc": {**os.environ, "TUNESMITH_ALLOCATOR": "system"}}
    for name, library in (("jemalloc", "libjemalloc.so.2"), ("tcmalloc", "libtcmalloc_minimal.so.4")):
        path = next((d / library for d in search_dirs() if (d / library).is_file()), None)
        if path is not None:
            found[name] = {**os.environ, "LD_PRELOAD": str(path)}
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=2)
    args = p.parse_args()
    envs = contenders()
    print(f"tunesmith's default here: {find_allocator() or 'glibc'}")
    results = {name: [] for name in envs}
    for rep in range(args.reps):
        for name in (list(envs) if rep % 2 == 0 else list(reversed(envs))):
            out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=envs[name])
            line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
            if out.returncode or not line:
                raise SystemExit(out.stderr[-3000:])
            results[name].append(json.loads(line[-1][7:]))
            print(rep, name, results[name][-1], flush=True)
    for name, rs in results.items():
        print(f"{name:9s} median {statistics.median(r['tps'] for r in rs):6.1f} tok/s, "
              f"peak RSS {statistics.median(r['rss'] for r in rs):6.0f} MiB")


if __name__ == "__main__":
    main()
