"""Predicted vs measured peak memory: the bill (tunesmith.plan) against real training steps.

    .venv/bin/python bench/plan_accuracy.py --out bench/results/plan_accuracy.json

For each model (the built-in SmolLM2-135M-Instruct and two random tiny Llamas of different shapes)
and each method (full, lora, qlora, galore), at two sequence lengths, one child process loads the
model, runs 2 optimizer steps through tunesmith's Trainer on synthetic tokens (micro batch 1, every
position supervised) and reports its peak RSS above the idle process (see tunesmith.planning.measure for
how). Each run gets a fresh process so one run's memory never counts in the next. Prints the markdown
table (predicted, measured, error) and writes the raw numbers as JSON.

The regularizers are checked the same way: `--regularize` (default: distill and ewc) runs lora and full with each,
at both lengths (EWC's Fisher pass before training is inside the measured window).

Preference objectives are checked the same way: `--preference` (the default: dpo, which adds the reference
pass) runs lora and full with each pair of two sequences of the first length (chosen + rejected in one row).

`--default-malloc` also measures the first sequence length with glibc's default malloc (freed memory
kept for reuse) to show how much allocator slack adds on top of the live memory the bill predicts.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = ("full", "lora", "qlora", "galore")
PREFERENCE_METHODS = ("full", "lora")  # the two references: precomputed, adapter disabled
# name: (hidden, layers, heads, kv heads, intermediate, tied embeddings)
TINY = {
    "tiny-gqa-256x4": (256, 4, 4, 2, 704, True),
    "tiny-mha-512x6": (512, 6, 8, 8, 1024, False),
}
SEQ = {"smollm2-135m-instruct": (64, 256), "tiny-gqa-256x4": (128, 512), "tiny-mha-512x6": (128, 512)}

CHILD = r"""
import json, sys
from tunesmith.quiet import quiet_libraries
quiet_libraries()
from tunesmith.config import load_config
from tunesmith.planning.measure import measure
model, method, seq, live, objective = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "live", sys.argv[5]
regularize = {sys.argv[6]: {}} if sys.argv[6] != "none" else {}
opts = {"galore": {"galore_rank": 64, "update_proj_gap": 200}}.get(method, {})
cfg = load_config({"model": model, "data": {"train": "(synthetic)"}, "method": {"name": method, **opts},
                   "train": {"bf16": False, "objective": objective}, "regularize": regularize})
m = measure(cfg, seq_len=seq, batch=1, steps=2, live_memory=live)
print("RESULT " + json.dumps(m.as_dict()))
"""


def build_tiny(root: Path) -> dict[str, str]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunesmith.models import load_tokenizer

    tok = load_tokenizer("smollm2-135m-instruct")
    paths = {}
    for name, (h, layers, heads, kv, inter, tied) in TINY.items():
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=1024,
                          tie_word_embeddings=tied, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id)
        out = root / name
        LlamaForCausalLM(cfg).save_pretrained(out)
        tok.save_pretrained(out)
        paths[name] = str(out)
    return paths


def run_one(model: str, method: str, seq: int, live: bool, objective: str = "sft", regularize: str = "none") -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, model, method, str(seq), "live" if live else "default",
                           objective, regularize], capture_output=True, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{model} {method} {seq} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results/plan_accuracy.json")
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--models", nargs="*", default=list(SEQ))
    parser.add_argument("--preference", nargs="*", default=["dpo"],
                        help="preference objectives to check too (lora and full, first length; none: --preference)")
    parser.add_argument("--regularize", nargs="*", default=["distill", "ewc"],
                        help="regularizers to check too (lora and full, both lengths; none: --regularize)")
    parser.add_argument("--default-malloc", action="store_true",
                        help="also measure each model/method at its first length without the live-malloc setting")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tunesmith-plan-bench-"))
    refs = {"smollm2-135m-instruct": "smollm2-135m-instruct", **build_tiny(work)}
    rows = []
    start = time.time()
    for model in args.models:
        for method in args.methods:
            for regularizer in args.regularize if method in PREFERENCE_METHODS else ():
                for seq in SEQ[model]:
                    r = run_one(refs[model], method, seq, live=True, regularize=regularizer)
                    r["label"], r["regularize"] = model, regularizer
                    rows.append(r)
                    print(f"{model} {method} + {regularizer} seq {seq}: predicted {r['predicted_mib']:.0f} MiB, "
                          f"measured {r['measured_mib']:.0f} MiB, error {r['error']:+.1%}", flush=True)
            for i, seq in enumerate(SEQ[model]):
                r = run_one(refs[model], method, seq, live=True)
                r["label"] = model
                rows.append(r)
                print(f"{model} {method} seq {seq}: predicted {r['predicted_mib']:.0f} MiB, measured "
                      f"{r['measured_mib']:.0f} MiB, error {r['error']:+.1%} ({time.time() - start:.0f} s)", flush=True)
                if args.default_malloc and i == 0:
                    d = run_one(refs[model], method, seq, live=False)
                    d["label"] = model
                    r["default_malloc_measured_mib"] = d["measured_mib"]
                    r["default_malloc_error"] = d["error"]
            for objective in args.preference if method in PREFERENCE_METHODS else ():
                r = run_one(refs[model], method, SEQ[model][0], live=True, objective=objective)
                r["label"] = model
                rows.append(r)
                print(f"{model} {method} {objective} seq {SEQ[model][0]} x 2: predicted {r['predicted_mib']:.0f} MiB, "
                      f"measured {r['measured_mib']:.0f} MiB, error {r['error']:+.1%}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))
    worst = max(abs(r["error"]) for r in rows)
    print(f"\n{len(rows)} runs in {time.time() - start:.0f} s; worst |error| {worst:.1%}\n")
    slack = args.default_malloc
    print("| model | method | tokens | predicted MiB | measured MiB | error | peak phase | s/step |"
          + (" default malloc MiB |" if slack else ""))
    print("| --- | --- | ---: | ---: | ---: | ---: | --- | ---: |" + (" ---: |" if slack else ""))
    for r in rows:
        extra = ""
        if slack:
            extra = f" {r['default_malloc_measured_mib']:.0f} |" if "default_malloc_measured_mib" in r else " |"
        method = r["method"] + (f" {r['objective']}" if r.get("objective", "sft") != "sft" else "") + (
            f" + {r['regularize']}" if r.get("regularize") else "")
        print(f"| {r['label']} | {method} | {r['batch']} x {r['seq_len']} | {r['predicted_mib']:.0f} | "
              f"{r['measured_mib']:.0f} | {r['error']:+.1%} | {r['peak_phase']} | {r['seconds_per_step']:.1f} |" + extra)


if __name__ == "__main__":
    main()
