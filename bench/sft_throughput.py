"""tunesmith's LoRA SFT against TRL's SFTTrainer + PEFT set up as the guide's §6.1 does it.

Same model (built-in SmolLM2-135M-Instruct), data (the quickstart booking task), LoRA (r=16,
alpha=32, dropout 0.05, all seven projections), micro batch 4 x accumulation 4, the same number of
optimizer steps, lr 2e-4 cosine with 3% warmup, completion-only loss, bf16 where the CPU has AMX
(`train.bf16: auto`; both autocast the same way). TRL keeps its defaults otherwise (padded batches; NEFTune
off in both) and runs twice: with gradient checkpointing (its default, as in the guide: its leanest setting)
and without (its fastest). Both read the examples in file order (TRL's sampler set to sequential,
tunesmith's `train.order: sequential`), so the final losses compare like for like. `--checkpointing` adds
tunesmith with gradient checkpointing, the low-memory operating point. Each run is its own process (peak
RSS is its own); runs alternate, `--reps` times each. The summary gives tunesmith's tokens/s over TRL's
fastest and its peak RSS over TRL's leanest, per paired rep. tunesmith runs as its command runs it, with
jemalloc preloaded where the machine has it (src/tunesmith/allocator.py); `--trl-jemalloc` adds TRL with
the same allocator, to show what the allocator alone is worth.

    .venv/bin/python bench/sft_throughput.py --steps 3 --reps 2 --trl-jemalloc

How cost grows (the README's growth table): the same contenders on the same task with each example's input
repeated to a longer sequence, and on a randomly initialised ~0.5B Llama (no download):

    .venv/bin/python bench/sft_throughput.py --seq-len 1024 --micro 1 --accum 4 --steps 2 --reps 1
    .venv/bin/python bench/sft_throughput.py --shape llama-0.5b --seq-len 256 --micro 1 --accum 4 --steps 2 --reps 1
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

COMMON = r"""
import json, resource, sys, time, threading, os
from tunesmith.quiet import quiet_libraries
quiet_libraries()
steps = int(sys.argv[2])
micro, accum = int(os.environ.get("BENCH_MICRO", 4)), int(os.environ.get("BENCH_ACCUM", 4))
data_file = os.environ.get("BENCH_DATA", "recipes/data/booking-train.jsonl")
model_ref = os.environ.get("BENCH_MODEL", "smollm2-135m-instruct")
workload = ([f"data.train={data_file}", f"data.max_length={os.environ['BENCH_MAX_LEN']}", f"model={model_ref}"]
            if "BENCH_MAX_LEN" in os.environ else [])
"""

TUNESMITH = COMMON + r"""
from tunesmith.config import load_config
from tunesmith.training.run import train
cfg = load_config("recipes/quickstart.yaml", [f"train.max_steps={steps}", f"train.batch_size={micro}",
    f"train.grad_accum={accum}", "train.lr=2e-4", "train.warmup=0.03", "train.logging_steps=1",
    "output_dir=/tmp/bench-sft-tunesmith", "train.eval_each_epoch=false", "train.order=sequential", *workload, *sys.argv[3:]])
cfg.data.eval = None
cfg.data.eval_split = 0.0
t0 = time.perf_counter()
run = train(cfg, overwrite=True, progress=False)
s = run.summary
lines = [json.loads(l) for l in open("/tmp/bench-sft-tunesmith/metrics.jsonl") if '"loss"' in l]
print("RESULT " + json.dumps({"tokens_per_second": s["tokens_seen"] / s["train_seconds"], "seconds": s["train_seconds"],
    "tokens": s["tokens_seen"], "final_loss": lines[-1]["loss"],
    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "trainable": s["trainable_parameters"], "total": s["total_parameters"]}))
"""

TRL = COMMON + r"""
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import SFTConfig, SFTTrainer
from tunesmith.device import use_bf16
from tunesmith.models import pull_builtin
folder = str(pull_builtin(model_ref)) if "/" not in model_ref else model_ref
tok = AutoTokenizer.from_pretrained(folder)
tok.padding_side = "right"
tok.pad_token = tok.eos_token
rows = [json.loads(l) for l in open(data_file)]
ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r["instruction"] + "\n\n" + r["input"]}],
                         "completion": [{"role": "assistant", "content": r["output"]}]} for r in rows])
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
args = SFTConfig(output_dir="/tmp/bench-sft-trl", max_steps=steps, per_device_train_batch_size=micro,
                 gradient_accumulation_steps=accum, optim="adamw_torch", learning_rate=2e-4, weight_decay=0.0,
                 warmup_steps=0.03, lr_scheduler_type="cosine", gradient_checkpointing=sys.argv[3] == "ckpt",
                 bf16=use_bf16("auto"), logging_steps=1, save_strategy="no", max_length=int(os.environ.get("BENCH_MAX_LEN", 512)), report_to=[],
                 use_cpu=True, seed=42, include_num_input_tokens_seen="non_padding", disable_tqdm=True,
                 train_sampling_strategy="sequential")
trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=lora)
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
    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "trainable": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
    "total": sum(p.numel() for p in trainer.model.parameters())}))
"""


def run(code: str, steps: int, extra: tuple[str, ...] = (), env: dict | None = None) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, "x", str(steps), *extra], capture_output=True, text=True, env=env)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(proc.stderr[-4000:])
    return json.loads(lines[-1][7:])


def matmul_peak(dtype, n: int = 2048, reps: int = 5) -> float:
    import torch

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t)


# A randomly initialised Llama of ~0.5B parameters with the built-in model's vocabulary: the "larger model" shape.
LLAMA_05B = dict(hidden_size=1280, intermediate_size=3456, num_hidden_layers=24, num_attention_heads=20,
                 num_key_value_heads=4, max_position_embeddings=8192, tie_word_embeddings=True)


def random_llama(folder: str) -> str:
    """The ~0.5B shape saved once under `folder` (weights random, tokenizer the built-in model's)."""
    from pathlib import Path

    if (Path(folder) / "config.json").exists():
        return folder
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = builtin_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, **LLAMA_05B)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def builtin_tokenizer():
    from transformers import AutoTokenizer

    from tunesmith.models import pull_builtin

    return AutoTokenizer.from_pretrained(str(pull_builtin("smollm2-135m-instruct")))


def rendered_length(tokenizer, row: dict) -> int:
    """Tokens of a row as both contenders train on it: the instruction and input as the user turn, the output as
    the assistant turn, in the model's chat template."""
    messages = [{"role": "user", "content": row["instruction"] + "\n\n" + row["input"]},
                {"role": "assistant", "content": row["output"]}]
    return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])


def long_rows(seq_len: int, count: int, path: str) -> str:
    """`count` booking rows whose input is repeated until the rendered example is about `seq_len` tokens: the same
    task at a longer sequence (the answer, the supervised part, stays short)."""
    tokenizer = builtin_tokenizer()
    rows = [json.loads(line) for line in open("recipes/data/booking-train.jsonl")]
    with open(path, "w") as f:
        for row in (rows * (count // len(rows) + 1))[:count]:
            once = rendered_length(tokenizer, row)
            per_copy = rendered_length(tokenizer, {**row, "input": row["input"] + " " + row["input"]}) - once
            repeats = max(1, 1 + round((seq_len - once) / per_copy))
            f.write(json.dumps({**row, "input": " ".join([row["input"]] * repeats)}) + "\n")
    return path


def mean_rendered_length(path: str) -> float:
    """Mean tokens per row of a data file, rendered as `rendered_length` does."""
    tokenizer = builtin_tokenizer()
    rows = [json.loads(line) for line in open(path)]
    return sum(rendered_length(tokenizer, row) for row in rows) / len(rows)


def workload_env(args) -> dict:
    """BENCH_* variables the child scripts read: micro batch, accumulation, data file, max length, model."""
    env = {"BENCH_MICRO": str(args.micro), "BENCH_ACCUM": str(args.accum)}
    if args.seq_len or args.shape != "builtin":
        seq_len = args.seq_len or 512
        env["BENCH_MAX_LEN"] = str(seq_len + 64)
        env["BENCH_DATA"] = long_rows(seq_len, args.steps * args.micro * args.accum, f"/tmp/bench-sft-{seq_len}.jsonl") \
            if args.seq_len else "recipes/data/booking-train.jsonl"
        env["BENCH_MODEL"] = random_llama("/tmp/bench-llama-0.5b") if args.shape == "llama-0.5b" else "smollm2-135m-instruct"
    return env


def base_contenders(work: dict) -> tuple[dict, dict, dict | None]:
    """(name -> (child code, its arguments, its environment), the plain environment, the preloaded one or None):
    tunesmith runs as its command does, with jemalloc preloaded where the machine has it (allocator.py)."""
    from tunesmith.allocator import preload_env

    system, preloaded = {**os.environ, **work}, preload_env({**os.environ, **work})
    return ({"tunesmith": (TUNESMITH, (), preloaded or system), "trl": (TRL, ("ckpt",), system),
             "trl-no-ckpt": (TRL, ("no-ckpt",), system)}, system, preloaded)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--checkpointing", action="store_true", help="Also run tunesmith with gradient checkpointing.")
    p.add_argument("--trl-jemalloc", action="store_true",
                   help="Also run TRL (checkpointing on) with the allocator tunesmith preloads: what the allocator alone gives.")
    p.add_argument("--seq-len", type=int, default=0,
                   help="Repeat each example's input until it is about this many tokens (default: the data as is).")
    p.add_argument("--shape", choices=["builtin", "llama-0.5b"], default="builtin",
                   help="The model: the built-in SmolLM2-135M or a randomly initialised ~0.5B Llama.")
    p.add_argument("--micro", type=int, default=4, help="Micro batch (examples).")
    p.add_argument("--accum", type=int, default=4, help="Gradient accumulation steps.")
    args = p.parse_args()
    import torch

    contenders, system, preloaded = base_contenders(workload_env(args))
    if preloaded and args.trl_jemalloc:
        contenders["trl+jemalloc"] = (TRL, ("ckpt",), preloaded)
    if args.checkpointing:
        contenders["tunesmith+ckpt"] = (TUNESMITH, ("train.gradient_checkpointing=true",), preloaded or system)
    results = {name: [] for name in contenders}
    for rep in range(args.reps):
        order = list(contenders) if rep % 2 == 0 else list(reversed(contenders))
        for name in order:
            code, extra, env = contenders[name]
            r = run(code, args.steps, extra, env)
            results[name].append(r)
            print(f"rep {rep} {name:14s} {r['tokens_per_second']:7.1f} tok/s  peak RSS {r['peak_rss_mib']:7.0f} MiB  "
                  f"final loss {r['final_loss']:.4f}", flush=True)
    peak32, peak16 = matmul_peak(torch.float32), matmul_peak(torch.bfloat16)
    print(f"\nmachine matmul peak: fp32 {peak32 / 1e9:.1f} GFLOP/s, bf16 {peak16 / 1e9:.1f} GFLOP/s")
    for name, rs in results.items():
        tps = statistics.median(r["tokens_per_second"] for r in rs)
        mfu = 4 * rs[0]["total"] * tps / peak32
        print(f"{name:14s} median {tps:6.1f} tok/s, peak RSS {statistics.median(r['peak_rss_mib'] for r in rs):.0f} MiB, "
              f"MFU vs fp32 peak {mfu:.1%}")
    for name in results:
        if name.startswith("trl"):
            continue
        print(f"\n{name} against TRL (min / median / max over paired reps):")
        pairs = [("tokens_per_second", "trl-no-ckpt"), ("peak_rss_mib", "trl"), ("final_loss", "trl"),
                 ("tokens_per_second", "trl"), ("peak_rss_mib", "trl-no-ckpt")]
        if "trl+jemalloc" in results:
            pairs += [("tokens_per_second", "trl+jemalloc"), ("peak_rss_mib", "trl+jemalloc")]
        for key, trl in pairs:
            ratios = [a[key] / b[key] for a, b in zip(results[name], results[trl])]
            print(f"  {key:18s} / {trl:12s} {min(ratios):.3f} / {statistics.median(ratios):.3f} / {max(ratios):.3f}")


if __name__ == "__main__":
    main()
