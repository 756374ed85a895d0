"""Learning per step: held-out task score of tunesmith and of TRL's SFTTrainer + PEFT with the same settings.

Each task is a recipe (its data, LoRA r/alpha/dropout/targets, steps, micro batch, accumulation, lr, warmup,
schedule, max length; `--set` applies to every task). tunesmith trains it as `tunesmith train` does (its
defaults: shuffled order, padding-free rows, every assistant turn supervised). TRL gets the same
conversations in its prompt-completion form (everything before the last assistant turn is the prompt; TRL
supervises that last turn only), the same hyperparameters and seed, and its own defaults otherwise (shuffled,
padded batches, completion-only loss). Both adapters are scored by the same code on the recipe's held-out rows:
`tunesmith.evaluation.run.score_generations`, greedy, the recipe's scorer. Every (task, seed, tool) is its own
process; tools alternate. The summary gives the mean, the spread (min-max) and each seed's score per tool.

    .venv/bin/python bench/learning.py --seeds 3                       # booking, shopping, multi-turn recall
    .venv/bin/python bench/learning.py --tasks booking --seeds 1 --limit 20   # a smoke run
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# name -> (recipe, overrides that make it a plain single-task run)
TASKS = {
    "booking": ("recipes/quickstart.yaml", []),
    "shopping": ("recipes/quickstart.yaml", ["eval.scorer=exact_match"]),  # + its data, written by shopping_data
    "recall": ("recipes/multiturn.yaml", []),
}

COMMON = r"""
import json, sys
from tunesmith.quiet import quiet_libraries
quiet_libraries()
from tunesmith.config import load_config
from tunesmith.data.assemble import eval_conversations, split_tasks
from tunesmith.evaluation.run import score_generations
recipe, seed, limit, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
cfg = load_config(recipe, [f"train.seed={seed}", f"output_dir={out}", "train.eval_each_epoch=false",
                           *json.loads(sys.argv[5])])
held = eval_conversations(cfg)[:limit] if limit else eval_conversations(cfg)
def report(model, tokenizer, steps):
    e = cfg.eval
    score, _ = score_generations(model, tokenizer, held, e.scorer, e.max_new_tokens, e.batch_size, progress=False)
    print("RESULT " + json.dumps({"score": score, "rows": len(held), "steps": steps}))
"""

TUNESMITH = COMMON + r"""
from tunesmith.inference import load_for_inference
from tunesmith.training.run import train
run = train(cfg, overwrite=True, progress=False)
loaded = load_for_inference(out)  # as `tunesmith eval RUN` loads it
report(loaded.model, loaded.tokenizer, run.summary["steps"])
"""

TRL = COMMON + r"""
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer
from tunesmith.device import use_bf16
from tunesmith.models import resolve_model
folder = resolve_model(cfg.model).path
tok = AutoTokenizer.from_pretrained(folder)
if tok.pad_token is None:
    tok.pad_token = tok.eos_token
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
train_convs = [conv for conv, _, _ in split_tasks(cfg)[0]]
last = lambda conv: max(i for i, m in enumerate(conv) if m["role"] == "assistant")
ds = Dataset.from_list([{"prompt": conv[: last(conv)], "completion": [conv[last(conv)]]} for conv in train_convs])
m, t = cfg.method, cfg.train
lora = LoraConfig(r=m.r, lora_alpha=m.alpha, lora_dropout=m.dropout, bias="none", task_type="CAUSAL_LM",
                  target_modules=m.target_modules)
args = SFTConfig(output_dir=out, max_steps=t.max_steps, per_device_train_batch_size=t.batch_size,
                 gradient_accumulation_steps=t.grad_accum, optim="adamw_torch", learning_rate=t.lr,
                 weight_decay=t.weight_decay, warmup_steps=t.warmup, lr_scheduler_type=t.scheduler,
                 bf16=use_bf16(t.bf16), logging_steps=10, save_strategy="no", max_length=cfg.data.max_length,
                 report_to=[], use_cpu=True, seed=seed, disable_tqdm=True)
trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=lora)
trainer.train()
trainer.model.eval()
report(trainer.model, tok, trainer.state.global_step)
"""


def run_one(tool: str, recipe: str, overrides: list[str], seed: int, limit: int) -> dict:
    code = TUNESMITH if tool == "tunesmith" else TRL
    out = f"/tmp/bench-learning-{tool}"
    proc = subprocess.run([sys.executable, "-c", code, recipe, str(seed), str(limit), out, json.dumps(overrides)],
                          capture_output=True, text=True, cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{tool} on {recipe} seed {seed} failed:\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][7:])


def shopping_data(folder: Path) -> list[str]:
    """The shopping task's files (tunesmith.demo.shopping, seed 0) written into `folder`, as recipe overrides."""
    sys.path.insert(0, str(REPO / "src"))
    from tunesmith.demo import shopping

    train, held_out = shopping.write(folder)
    return [f"data.train={train.resolve()}", f"data.eval={held_out.resolve()}"]


def summary_rows(results: dict) -> list[str]:
    """A markdown table: per task and tool, mean score, min-max and the scores by seed."""
    rows = ["| task | tool | mean | min-max | by seed |", "| --- | --- | ---: | ---: | --- |"]
    for (task, tool), scores in results.items():
        rows.append(f"| {task} | {tool} | {statistics.mean(scores):.1%} | {min(scores):.1%}-{max(scores):.1%} | "
                    + " ".join(f"{s:.0%}" for s in scores) + " |")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default=",".join(TASKS), help=f"Comma-separated, from {', '.join(TASKS)}.")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--limit", type=int, default=60, help="Held-out rows scored per run (0: all).")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="A recipe override for every task.")
    p.add_argument("--json", type=Path, default=None, help="Also write every score here.")
    p.add_argument("--data", type=Path, default=REPO / "runs/learning-data", help="Where generated task data goes.")
    args = p.parse_args()
    tasks = args.tasks.split(",")
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise SystemExit(f"--tasks: unknown {unknown}; choose from {sorted(TASKS)}")
    results: dict[tuple[str, str], list[float]] = {}
    for task in tasks:
        recipe, overrides = TASKS[task]
        if task == "shopping":
            overrides = overrides + shopping_data(args.data)
        for seed in range(args.seeds):
            tools = ["tunesmith", "trl"] if seed % 2 == 0 else ["trl", "tunesmith"]
            for tool in tools:
                r = run_one(tool, recipe, overrides + args.overrides, 42 + seed, args.limit)
                results.setdefault((task, tool), []).append(r["score"])
                print(f"{task:9s} seed {42 + seed} {tool:9s} score {r['score']:.1%} on {r['rows']} rows "
                      f"({r['steps']} steps)", flush=True)
    print("\n" + "\n".join(summary_rows(results)))
    if args.json:
        args.json.write_text(json.dumps({f"{t}/{tool}": s for (t, tool), s in results.items()}, indent=1))


if __name__ == "__main__":
    main()
