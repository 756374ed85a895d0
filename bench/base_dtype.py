"""tunesmith's default LoRA run with the frozen base stored in bf16 (its default when bf16 is on) against the
same run with the base in fp32 (what autocast then copies to bf16 at every matmul), each in its own process,
alternating, 2 reps each; prints tokens/s and peak RSS. Meaningful where bf16 is on (a CPU with AMX, a GPU).

    .venv/bin/python bench/base_dtype.py
"""
import json, subprocess, sys, statistics
CHILD = r'''
import sys, json, resource
from tunesmith.quiet import quiet_libraries
quiet_libraries()
import torch
import tunesmith.methods as m
if sys.argv[1] == "fp32":
    m.frozen_base_dtype = lambda config: torch.float32
from tunesmith.config import load_config
from tunesmith.training import run as R
cfg = load_config("recipes/quickstart.yaml", ["train.max_steps=3", "train.batch_size=4", "train.grad_accum=4",
    "output_dir=/tmp/bench-base-dtype", "train.eval_each_epoch=false", "train.order=sequential", "train.save_steps=1000", *sys.argv[2:]])
cfg.data.eval = None
cfg.data.eval_split = 0.0
s = R.train(cfg, overwrite=True, progress=False).summary
print("RESULT " + json.dumps({"tps": s["tokens_per_second"], "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
'''
res = {"bf16": [], "fp32": []}
extra = sys.argv[1:]
for rep in range(2):
    for name in (["bf16", "fp32"] if rep % 2 == 0 else ["fp32", "bf16"]):
        out = subprocess.run([sys.executable, "-c", CHILD, name, *extra], capture_output=True, text=True)
        line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
        if not line:
            print(out.stderr[-3000:]); sys.exit(1)
        r = json.loads(line[-1][7:]); res[name].append(r)
        print(rep, name, r, flush=True)
for name, rs in res.items():
    print(name, "median tok/s", statistics.median(r["tps"] for r in rs), "rss", statistics.median(r["rss"] for r in rs))
