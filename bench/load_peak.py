"""Peak memory of loading a model in another dtype than its file's: `load_model` (load as stored, cast tensor by
tensor, release each source's pages; src/tunesmith/weight_cast.py) against `from_pretrained(dtype=...)`, each in
its own process, alternating. Default: the bench's random ~0.5B Llama (fp32 file) loaded in bf16.

    .venv/bin/python bench/load_peak.py --reps 3
    .venv/bin/python bench/load_peak.py --model smollm2-135m-instruct --dtype bfloat16
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from sft_throughput import random_llama  # noqa: E402

CHILD = r"""
import json, resource, sys, time
import torch
from tunesmith.quiet import quiet_libraries
quiet_libraries()
from transformers import AutoModelForCausalLM
from tunesmith.models import load_model, resolve_model
how, ref, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
t = time.perf_counter()
if how == "tunesmith":
    model = load_model(ref, dtype=dtype)
else:
    model = AutoModelForCausalLM.from_pretrained(resolve_model(ref).path, dtype=dtype)
seconds = time.perf_counter() - t
weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
print("RESULT " + json.dumps({"seconds": seconds, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                              "weights_mib": weights}))
"""


def run(how: str, ref: str, dtype: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, how, ref, dtype], capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(proc.stderr[-2000:])
    return json.loads(lines[-1][7:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="A model reference (default: the random ~0.5B Llama, built once under /tmp).")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    ref = args.model or random_llama("/tmp/bench-llama-0.5b")
    results: dict[str, list[dict]] = {"from_pretrained": [], "tunesmith": []}
    for rep in range(args.reps):
        for how in list(results) if rep % 2 == 0 else reversed(list(results)):
            results[how].append(run(how, ref, args.dtype))
            r = results[how][-1]
            print(f"rep {rep} {how:15s} peak {r['peak_rss_mib']:7.0f} MiB  {r['seconds']:5.2f} s", flush=True)
    weights = results["tunesmith"][0]["weights_mib"]
    print(f"\n{ref} in {args.dtype} ({weights:,.0f} MiB of weights), medians of {args.reps}:")
    print("| loader | peak RSS (MiB) | seconds |\n| --- | ---: | ---: |")
    for how, rs in results.items():
        print(f"| {how} | {statistics.median(r['peak_rss_mib'] for r in rs):,.0f} | "
              f"{statistics.median(r['seconds'] for r in rs):.2f} |")


if __name__ == "__main__":
    main()
