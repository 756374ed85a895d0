"""Time and peak memory of `tunesmith merge` on two copies of the built-in model, per method.

    python bench/merge.py                       # every method, plus the naive in-memory anchor
    python bench/merge.py --methods ties slerp  # a subset

The two "copies" are SmolLM2-135M-Instruct (538 MB of float32) plus small seeded noise, so every
tensor differs and every method does its full work; task-vector methods use the built-in model as the
base. Each merge runs in a fresh process that resets its peak-RSS mark after importing (Linux
/proc/self/clear_refs), so "peak growth" is what the merge itself added. The anchor loads all state
dicts whole (safetensors.torch.load_file), averages them and saves with save_file: the usual
few-line script. Output: a markdown table, and the ratio of each method to the anchor.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = ["linear", "slerp", "task_arithmetic", "ties", "dare_linear", "dare_ties"]

CHILD = r"""
import json, sys, time, threading
import psutil, torch
spec, out, mode = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
proc = psutil.Process()
if mode == "tunesmith":
    from tunesmith.merging.run import merge
try:
    open("/proc/self/clear_refs", "w").write("5")
    sampled = None
except OSError:
    sampled, done = [0], threading.Event()
    def sample():
        while not done.is_set():
            sampled[0] = max(sampled[0], proc.memory_info().rss); time.sleep(0.005)
    threading.Thread(target=sample, daemon=True).start()
before = proc.memory_info().rss
start = time.perf_counter()
if mode == "tunesmith":
    merge(spec, out, overwrite=True, progress=False)
else:  # the naive anchor: whole state dicts in memory
    from safetensors.torch import load_file, save_file
    import os, shutil
    sds = [load_file(m + "/model.safetensors") for m in spec["models"]]
    merged = {k: sum(sd[k] for sd in sds) / len(sds) for k in sds[0]}
    os.makedirs(out, exist_ok=True)
    save_file(merged, out + "/model.safetensors", metadata={"format": "pt"})
seconds = time.perf_counter() - start
if sampled is None:
    peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
else:
    done.set(); peak = sampled[0]
print(json.dumps({"seconds": seconds, "before": before, "peak": peak}))
"""


def make_copies(workdir: Path) -> tuple[str, list[str], int, int]:
    """Two noisy copies of the built-in model (written once, streamed); returns base, copies, sizes."""
    import shutil

    import torch

    from tunesmith.merging.io import ModelWeights, PlannedTensor, ShardedWriter
    from tunesmith.models import resolve_model

    base = resolve_model("smollm2-135m-instruct").path
    weights = ModelWeights(base)
    largest = max(i.nbytes for i in weights.infos.values())
    copies = []
    for seed in (1, 2):
        folder = workdir / f"copy{seed}"
        copies.append(str(folder))
        if (folder / "model.safetensors").exists():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        for f in Path(base).iterdir():
            if f.suffix != ".safetensors":
                shutil.copy(f, folder / f.name)
        plan = [PlannedTensor(n, i.dtype, i.shape) for n, i in weights.infos.items()]
        writer = ShardedWriter(folder, plan)
        g = torch.Generator().manual_seed(seed)
        for name in weights.names():
            t = weights.read(name)
            writer.write(name, t + 1e-3 * t.std() * torch.randn(t.shape, generator=g))
        writer.close()
    return base, copies, weights.nbytes, largest


def run_child(spec: dict, out: Path, mode: str) -> dict:
    res = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec), str(out), mode],
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{mode} {spec.get('method')} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--no-anchor", action="store_true", help="Skip the naive in-memory merge.")
    parser.add_argument("--workdir", default=None, help="Keep the copies here between runs (default: a temp dir).")
    args = parser.parse_args(argv)

    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="tunesmith-bench-merge-")
    workdir = Path(args.workdir or tmp.name)
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    base, copies, model_bytes, largest = make_copies(workdir)
    print(f"inputs: two noisy copies of smollm2-135m-instruct ({model_bytes / 2**20:.0f} MiB each, largest tensor "
          f"{largest / 2**20:.0f} MiB), made in {time.perf_counter() - t0:.0f} s; {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}\n", flush=True)

    rows = []
    if not args.no_anchor:
        r = run_child({"models": copies}, workdir / "out-naive", "naive")
        rows.append(("naive in-memory linear (anchor)", r))
    for method in args.methods:
        spec: dict = {"method": method, "models": copies}
        if method not in ("linear", "slerp"):
            spec["base_model"] = base
        r = run_child(spec, workdir / f"out-{method}", "tunesmith")
        rows.append((method, r))

    anchor = rows[0][1] if not args.no_anchor else None
    print("| method | seconds | peak RSS growth (MiB) | in largest tensors | vs anchor: time | vs anchor: memory |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in rows:
        growth = r["peak"] - r["before"]
        ratio_t = f"{r['seconds'] / anchor['seconds']:.2f}x" if anchor else "-"
        ratio_m = f"{growth / max(1, anchor['peak'] - anchor['before']):.2f}x" if anchor else "-"
        print(f"| {name} | {r['seconds']:.1f} | {growth / 2**20:.0f} | {growth / largest:.1f} | {ratio_t} | {ratio_m} |",
              flush=True)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
