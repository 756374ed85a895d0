"""The streaming bound: merging two ~100 MB models grows the process by a few tensors, not by models.

Each merge runs in a fresh subprocess that imports everything and does a warm-up merge first, then
resets the kernel's peak-RSS mark (/proc/self/clear_refs), reads its resident memory, merges, and
reports the peak (VmHWM in /proc/self/status; where clear_refs is unavailable, RSS sampled every 2 ms).
The models are 25 random tensors of 4 MiB each, so the largest tensor is known: a merge that loaded
whole models would grow by 200-300 MB.

With glibc's default (dynamic) mmap threshold, freed tensors under 32 MiB go back to the heap, whose
fragmentation can add a few tensors to the peak (the engine calls malloc_trim after each tensor).
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tunesmith.merging.io import save_streaming

TENSORS = 25
TENSOR_SHAPE = (1024, 1024)  # 4 MiB of float32
TENSOR_BYTES = 1024 * 1024 * 4
MODEL_BYTES = TENSORS * TENSOR_BYTES  # 100 MiB

CHILD = textwrap.dedent("""
    import json, sys, threading, time
    import psutil, torch
    from tunesmith.merging.run import merge

    root = sys.argv[1]
    spec = json.loads(sys.argv[2])
    small = dict(spec, models=[root + "/small1", root + "/small2"])
    if "base_model" in spec:
        small["base_model"] = root + "/small0"
    merge(small, root + "/warmup-" + spec["method"], overwrite=True, progress=False)  # first calls allocate lazily
    proc = psutil.Process()
    try:  # reset the kernel's peak-RSS mark, so imports and warm-up do not count
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        sampled = None
    except OSError:  # no clear_refs: sample the RSS instead
        sampled, done = [0], threading.Event()
        def sample():
            while not done.is_set():
                sampled[0] = max(sampled[0], proc.memory_info().rss)
                time.sleep(0.002)
        threading.Thread(target=sample, daemon=True).start()
    before = proc.memory_info().rss
    merge(spec, root + "/out-" + spec["method"], overwrite=True, progress=False)
    if sampled is None:  # VmHWM, the peak since the reset (ru_maxrss may also keep an older, larger mark)
        with open("/proc/self/status") as f:
            peak = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
    else:
        done.set()
        peak = sampled[0]
    print(json.dumps({"before": before, "peak": peak}))
""")


def write_model(folder: Path, seed: int, n: int, shape) -> Path:
    g = torch.Generator().manual_seed(seed)
    tensors = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(shape, generator=g) for i in range(n)}
    save_streaming(folder, tensors)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": n}))
    return folder


@pytest.fixture(scope="module")
def big_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("rss")
    for i in range(3):
        write_model(root / f"big{i}", seed=i, n=TENSORS, shape=TENSOR_SHAPE)
        write_model(root / f"small{i}", seed=10 + i, n=2, shape=(64, 64))
    return root


def child_peak(root, spec: dict, env: dict | None = None) -> int:
    import os

    res = subprocess.run([sys.executable, "-c", CHILD, str(root), json.dumps(spec)], capture_output=True, text=True,
                         timeout=180, env={**os.environ, **(env or {})})
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    out = Path(root) / f"out-{spec['method']}" / "model.safetensors"
    assert out.stat().st_size > MODEL_BYTES  # the whole model was really written
    return report["peak"] - report["before"]


@pytest.mark.parametrize("method,max_tensors", [
    ("linear", 6),  # the running sum and the tensor being added (measured: 2)
    # base, two trimmed deltas, sign, divisor and one temporary (measured: 6), plus heap fragmentation
    # (measured up to 8.5; 6 with MALLOC_MMAP_THRESHOLD_=65536)
    ("ties", 12),
])
@pytest.mark.slow
def test_peak_memory_stays_at_a_few_tensors(big_models, method, max_tensors):
    root = big_models
    spec = {"method": method, "models": [str(root / "big1"), str(root / "big2")]}
    if method == "ties":
        spec["base_model"] = str(root / "big0")
    growth = child_peak(root, spec)
    print(f"{method}: peak RSS growth {growth / 2**20:.1f} MiB = "
          f"{growth / TENSOR_BYTES:.1f} tensors (one model is {MODEL_BYTES / 2**20:.0f} MiB)")
    assert growth < max_tensors * TENSOR_BYTES, f"{growth / 2**20:.0f} MiB"
    assert growth < 0.5 * MODEL_BYTES
