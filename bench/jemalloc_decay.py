"""tunesmith's training with jemalloc's oversize arena keeping its freed pages (`allocator.keep_oversize_pages`,
what `train` does) against jemalloc's default (that arena returns them at once), and against no purging in any
arena (`MALLOC_CONF=dirty_decay_ms:-1`), on tunesmith's default LoRA run (the quickstart data, micro batch 4 x
accumulation 4) and on 4096-token examples (micro batch 1 x accumulation 4, the growth bench's rows): tokens/s
and peak RSS, each run its own process, alternating.

jemalloc serves requests above 8 MiB from an arena that gives freed pages straight back to the kernel, so the
next tensor of that size faults every page in again: at 4096 tokens a LoRA layer's dropout mask and casts are
tens of MiB each.

    .venv/bin/python bench/jemalloc_decay.py --reps 2
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from sft_throughput import base_contenders, run, workload_env  # noqa: E402

# setting -> (MALLOC_CONF, whether keep_oversize_pages is turned into a no-op in the child)
SETTINGS = {"oversize pages kept": (None, False), "jemalloc default": (None, True),
            "dirty_decay_ms:-1": ("dirty_decay_ms:-1", True)}
DEFAULT_PURGING = "import tunesmith.training.run as run_module\nrun_module.keep_oversize_pages = lambda largest: False\n"
WORKLOADS = {"default run": dict(seq_len=0, steps=2, micro=4), "4096 tokens": dict(seq_len=4096, steps=1, micro=1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=2)
    args = p.parse_args()
    results = {(w, s): [] for w in WORKLOADS for s in SETTINGS}
    for workload, shape in WORKLOADS.items():
        setups, _, preloaded = base_contenders(workload_env(argparse.Namespace(shape="builtin", accum=4, **shape)))
        if preloaded is None:
            raise SystemExit("no jemalloc preloaded on this machine (src/tunesmith/allocator.py): nothing to compare")
        code, extra, env = setups["tunesmith"]
        for rep in range(args.reps):
            for setting in list(SETTINGS) if rep % 2 == 0 else reversed(list(SETTINGS)):
                conf, default_purging = SETTINGS[setting]
                child_env = {k: v for k, v in env.items() if k != "MALLOC_CONF"} | ({"MALLOC_CONF": conf} if conf else {})
                r = run((DEFAULT_PURGING if default_purging else "") + code, shape["steps"], extra, child_env)
                results[(workload, setting)].append(r)
                print(f"{workload} rep {rep} {setting:20s} {r['tokens_per_second']:6.1f} tok/s  "
                      f"{r['peak_rss_mib']:6.0f} MiB", flush=True)
    print("\n| workload | jemalloc | tokens/s (median) | peak RSS (MiB, median) |\n| --- | --- | ---: | ---: |")
    for (workload, setting), rs in results.items():
        print(f"| {workload} | {setting} | {statistics.median(r['tokens_per_second'] for r in rs):.1f} | "
              f"{statistics.median(r['peak_rss_mib'] for r in rs):,.0f} |")


if __name__ == "__main__":
    main()
