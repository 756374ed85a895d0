"""tunesmith's LoRA DPO against TRL 1.16's DPOTrainer + PEFT on the same pairs and settings.

Same model (built-in SmolLM2-135M-Instruct), pairs (the quickstart booking task: the chosen reply is the
right JSON, the rejected one has the date a year off), LoRA (r=16, alpha=32, no dropout: TRL's DPOTrainer
disables dropout by default, all seven projections), beta 0.1 sigmoid loss, micro batch 4 pairs x
accumulation 4, the same number of optimizer steps, lr 5e-5 cosine with 3% warmup, file order, bf16 where
`train.bf16: auto` picks it. The reference is the adapter-disabled base in both. TRL runs twice: with gradient
checkpointing (its default) and without (its fastest). Each run is its own process (peak RSS is its own);
runs alternate, `--reps` times each. The summary gives tunesmith's tokens/s over TRL's fastest and its
peak RSS over TRL's leanest, per paired rep, and the final losses side by side. tunesmith runs as its command
runs it, with jemalloc preloaded where the machine has it (src/tunesmith/allocator.py), as in
bench/sft_throughput.py.

    .venv/bin/python bench/dpo_throughput.py --steps 3 --reps 2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

PAIRS_FILE = "/tmp/bench-dpo-pairs.jsonl"

COMMON = r"""
import json, resource, sys, time
from tunesmith.quiet import quiet_libraries
quiet_libraries()
steps, micro, accum = int(sys.argv[2]), 4, 4
pairs = [json.loads(l) for l in open(sys.argv[3])]
"""

TUNESMITH = COMMON + r"""
from tunesmith.config import load_config
from tunesmith.training.run import train
cfg = load_config({"model": "smollm2-135m-instruct", "data": {"train": sys.argv[3], "eval_split": 0.0, "max_length": 512},
    "method": {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0},
    "train": {"objective": "dpo", "max_steps": steps, "batch_size": micro, "grad_accum": accum, "lr": 5e-5,
              "warmup": 0.03, "logging_steps": 1, "order": "sequential", "eval_each_epoch": False},
    "preference": {"beta": 0.1}, "output_dir": "/tmp/bench-dpo-tunesmith"})
run = train(cfg, overwrite=True, progress=False)
s = run.summary
lines = [json.loads(l) for l in open("/tmp/bench-dpo-tunesmith/metrics.jsonl") if '"loss"' in l]
print("RESULT " + json.dumps({"tokens_per_second": s["tokens_seen"] / s["train_seconds"], "seconds": s["train_seconds"],
    "tokens": s["tokens_seen"], "final_loss": lines[-1]["loss"],
    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

TRL = COMMON + r"""
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import DPOConfig, DPOTrainer
from tunesmith.device import use_bf16
from tunesmith.models import pull_builtin
folder = str(pull_builtin("smollm2-135m-instruct"))
tok = AutoTokenizer.from_pretrained(folder)
ds = Dataset.from_list([{"prompt": [{"role": "user", "content": p["prompt"]}],
                         "chosen": [{"role": "assistant", "content": p["chosen"]}],
                         "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs])
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
args = DPOConfig(output_dir="/tmp/bench-dpo-trl", max_steps=steps, per_device_train_batch_size=micro,
                 gradient_accumulation_steps=accum, optim="adamw_torch", learning_rate=5e-5, weight_decay=0.0,
                 warmup_steps=0.03, lr_scheduler_type="cosine", gradient_checkpointing=sys.argv[4] == "ckpt",
                 bf16=use_bf16("auto"), logging_steps=1, save_strategy="no", max_length=512, report_to=[],
                 use_cpu=True, seed=42, include_num_input_tokens_seen="non_padding", disable_tqdm=True,
                 train_sampling_strategy="sequential", beta=0.1)
trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=lora)
losses = []
class Keep(TrainerCallback):
    def on_log(self, a, state, c, logs=None, **k):
        if logs and "loss" in logs:
            losses.append(logs["loss"])
trainer.add_callback(Keep())
t0 = time.perf_counter()
trainer.train()
dt = time.perf_counter() - t0
tokens = int(trainer.state.num_input_tokens_seen)
print("RESULT " + json.dumps({"tokens_per_second": tokens / dt, "seconds": dt, "tokens": tokens, "final_loss": losses[-1],
    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def write_pairs(path: str) -> None:
    """The quickstart booking rows as pairs: the right JSON against the same JSON with the year one off."""
    with open("recipes/data/booking-train.jsonl", encoding="utf-8") as f, open(path, "w", encoding="utf-8") as out:
        for line in f:
            row = json.loads(line)
            answer = json.loads(row["output"])
            wrong = {**answer, "date": str(int(answer["date"][:4]) + 1) + answer["date"][4:]}
            out.write(json.dumps({"prompt": row["instruction"] + "\n\n" + row["input"], "chosen": row["output"],
                                  "rejected": json.dumps(wrong)}) + "\n")


def run(code: str, steps: int, extra: tuple[str, ...] = (), env: dict | None = None) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, "x", str(steps), PAIRS_FILE, *extra], capture_output=True,
                          text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(proc.stderr[-4000:])
    return json.loads(lines[-1][7:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    from tunesmith.allocator import preload_env

    write_pairs(PAIRS_FILE)
    system = dict(os.environ)
    contenders = {"tunesmith": (TUNESMITH, (), preload_env(system) or system), "trl": (TRL, ("ckpt",), system),
                  "trl-no-ckpt": (TRL, ("no-ckpt",), system)}
    results = {name: [] for name in contenders}
    for rep in range(args.reps):
        order = list(contenders) if rep % 2 == 0 else list(reversed(contenders))
        for name in order:
            code, extra, env = contenders[name]
            r = run(code, args.steps, extra, env)
            results[name].append(r)
            print(f"rep {rep} {name:12s} {r['tokens_per_second']:7.1f} tok/s  peak RSS {r['peak_rss_mib']:7.0f} MiB  "
                  f"final loss {r['final_loss']:.4f}", flush=True)
    for name, rs in results.items():
        print(f"{name:12s} median {statistics.median(r['tokens_per_second'] for r in rs):6.1f} tok/s, "
              f"peak RSS {statistics.median(r['peak_rss_mib'] for r in rs):.0f} MiB")
    print("\ntunesmith against TRL (min / median / max over paired reps):")
    for key, trl in (("tokens_per_second", "trl-no-ckpt"), ("peak_rss_mib", "trl"), ("final_loss", "trl"),
                     ("tokens_per_second", "trl"), ("peak_rss_mib", "trl-no-ckpt")):
        ratios = [a[key] / b[key] for a, b in zip(results["tunesmith"], results[trl])]
        print(f"  {key:18s} / {trl:12s} {min(ratios):.3f} / {statistics.median(ratios):.3f} / {max(ratios):.3f}")


if __name__ == "__main__":
    main()
