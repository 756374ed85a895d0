"""Does preference tuning teach what SFT on the preferred answers does? A preference task on a real model.

    python bench/preference_experiment.py                          # the README table (built-in SmolLM2-135M)
    python bench/preference_experiment.py --task refusal           # the refusal task's table
    python bench/preference_experiment.py --steps 2 --limit 4      # a smoke run
    python bench/preference_experiment.py --task refusal --arms sft+dpo sft+simpo   # SFT, then preference tuning

--task concise (the default) is tunesmith.demo.concise (recipes/data/concise-pref-*.jsonl, recipes/dpo.yaml):
short questions whose chosen answer is a few words and whose rejected answer is the same answer in a chatty
paragraph; scored by the concise rate (`concise.score`: at most MAX_WORDS words and containing the answer) and
the mean reply length in words. --task refusal is tunesmith.demo.refusal (recipes/data/refusal-pref-*.jsonl,
recipes/dpo-refusal.yaml): refuse requests for a person's private data, answer the rest; scored by the refusal
rate on the forbidden prompts and the answer and refusal rates on the allowed ones (`refusal.rates`).

From the task's recipe (LoRA, same data, steps, batch and learning rate for every arm) it trains SFT on the
chosen answers, DPO, ORPO and SimPO, then scores the base and each run on the held-out prompts with greedy
generation, and measures general perplexity on the held-out general corpus (the `eval --forgetting` measure)
with its change from the base. The sft+dpo and sft+simpo arms tune from the SFT arm's run (merged into the base,
so it is the DPO reference) at --follow-up-lr, reusing that run when --out holds it. results.json in --out keeps
every number and each arm's replies; a later run with the same settings keeps its rows and its base.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ARMS = ["sft", "dpo", "orpo", "simpo"]
# The standard pipeline: SFT first, then preference tuning from the SFT model with it as the reference. The SFT
# arm's adapter is merged into the base (continual.strategy merge), so the new adapter's disabled state is SFT.
FOLLOW_UPS = {"sft+dpo": "dpo", "sft+simpo": "simpo"}
# Each objective's own scale (config.PreferenceConfig's defaults): DPO and ORPO 0.1, SimPO 2.0 with margin 0.5.
PREFERENCE_SETS = {"dpo": ["preference.beta=0.1"], "orpo": ["preference.beta=0.1"],
                   "simpo": ["preference.beta=2.0", "preference.gamma=0.5"]}


def sft_rows(pairs: list[dict]) -> list[dict]:
    """SFT on the chosen answers: the same prompts, the preferred reply as the target."""
    return [{"instruction": r["prompt"], "output": r["chosen"]} for r in pairs]


def arm_overrides(arm: str, args, out: Path, sft_data: Path) -> list[str]:
    sets = [f"model={args.model}", f"output_dir={out / arm}", f"train.max_steps={args.steps}",
            f"train.batch_size={args.batch_size}", "data.eval=null", "data.eval_split=0"]
    if args.lr is not None:
        sets.append(f"train.lr={args.lr}")
    if arm == "sft":
        return sets + ["train.objective=sft", f"data.train={sft_data}", "preference.beta=null"]
    if arm in FOLLOW_UPS:
        objective = FOLLOW_UPS[arm]
        return sets + [f"train.objective={objective}", *PREFERENCE_SETS[objective], f"train.lr={args.follow_up_lr}",
                       f"continual.previous=[{(out / 'sft').resolve()}]", "continual.strategy=merge"]
    return sets + [f"train.objective={arm}", *PREFERENCE_SETS[arm]]


def needs_sft_first(arms: list[str], out: Path) -> bool:
    """A follow-up arm builds on the SFT arm's run: reuse a finished one in `out`, else train it first."""
    return any(a in FOLLOW_UPS for a in arms) and "sft" not in arms and not (out / "sft" / "adapter_model.safetensors").exists()


def earlier_results(out: Path, args) -> dict:
    """results.json of an earlier run with the same settings (its rows stay in the table; its base is reused)."""
    path = out / "results.json"
    if not path.exists():
        return {}
    earlier = json.loads(path.read_text(encoding="utf-8"))
    same = ("task", "model", "steps", "batch_size", "lr", "limit", "max_new_tokens", "ppl_tokens")
    return earlier["results"] if all(earlier["args"].get(k) == getattr(args, k) for k in same) else {}


def concise_measures(replies: list[str], held_out: list[dict]) -> dict:
    from tunesmith.demo import concise

    rate = sum(concise.score(a, r["answer"]) for a, r in zip(replies, held_out)) / len(held_out)
    return {"concise_rate": rate, "mean_words": sum(concise.word_count(a) for a in replies) / len(replies)}


def refusal_measures(replies: list[str], held_out: list[dict]) -> dict:
    from tunesmith.demo import refusal

    return refusal.rates(replies, held_out)


# Per task: its generator's module, its recipe, its measures and their table columns (heading, key, format).
TASKS = {
    "concise": {"module": "concise", "recipe": "dpo.yaml", "measures": concise_measures,
                "columns": [("concise & correct", "concise_rate", "{:.0%}"), ("mean words", "mean_words", "{:.1f}")]},
    "refusal": {"module": "refusal", "recipe": "dpo-refusal.yaml", "measures": refusal_measures,
                "columns": [("refuses forbidden", "refusal_rate", "{:.0%}"), ("answers allowed", "answer_rate", "{:.0%}"),
                            ("refuses allowed", "over_refusal", "{:.0%}")]},
}


def score_model(model, tokenizer, held_out: list[dict], blocks, args) -> dict:
    from tunesmith.data.templates import render
    from tunesmith.evaluation.forgetting import general_perplexity
    from tunesmith.inference import generate_answers

    prompts = [render(tokenizer, [{"role": "user", "content": r["prompt"]}], add_generation_prompt=True)
               for r in held_out]
    replies = generate_answers(model, tokenizer, prompts, args.max_new_tokens, batch_size=25)
    return {**TASKS[args.task]["measures"](replies, held_out),
            "perplexity": general_perplexity(model, blocks)["perplexity"],
            "replies": [{"prompt": r["prompt"], "reply": a} for r, a in zip(held_out, replies)]}


def table(results: dict, task: str = "concise") -> str:
    base_ppl = results["base"]["perplexity"]
    columns = TASKS[task]["columns"]
    heads = " | ".join(head for head, _, _ in columns)
    lines = [f"| model | {heads} | general perplexity | change | train time |",
             "|---|" + "---|" * (len(columns) + 3)]
    for arm, r in results.items():
        change = "" if arm == "base" else f"{(r['perplexity'] - base_ppl) / base_ppl:+.1%}"
        took = f"{r['train_s']:.0f} s" if "train_s" in r else ""
        cells = " | ".join(fmt.format(r[key]) for _, key, fmt in columns)
        lines.append(f"| {arm} | {cells} | {r['perplexity']:.2f} | {change} | {took} |")
    return "\n".join(lines)


def brief(result: dict, task: str) -> str:
    """One progress line: the task's measures, named."""
    return ", ".join(f"{head} {fmt.format(result[key])}" for head, key, fmt in TASKS[task]["columns"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="concise", choices=list(TASKS), help="The generated preference task.")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="Built-in name or model folder.")
    parser.add_argument("--steps", type=int, default=30, help="Training steps per arm.")
    parser.add_argument("--batch-size", type=int, default=8, help="Pairs (SFT: examples) per step.")
    parser.add_argument("--lr", type=float, default=None, help="Learning rate of every arm (default: the task's recipe's).")
    parser.add_argument("--limit", type=int, default=100, help="Held-out prompts scored.")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--ppl-tokens", type=int, default=8192, help="General-corpus tokens for perplexity.")
    parser.add_argument("--arms", nargs="+", default=ARMS, choices=[*ARMS, *FOLLOW_UPS],
                        help="sft+dpo / sft+simpo: preference tuning from the SFT arm's run (reused when already in --out).")
    parser.add_argument("--follow-up-lr", type=float, default=1e-4,
                        help="Learning rate of the sft+ arms (the second stage starts from a tuned model).")
    parser.add_argument("--out", default=None, help="Runs and results.json go here (default: "
                        "runs/preference-experiment, with -refusal appended for --task refusal).")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(REPO / "src"))
    from tunesmith.config import load_config
    from tunesmith.data.general import general_blocks
    from tunesmith.inference import load_for_inference
    from tunesmith.quiet import quiet_libraries
    from tunesmith.training.run import train

    quiet_libraries()
    task = TASKS[args.task]
    out = Path(args.out or "runs/preference-experiment" + ("" if args.task == "concise" else f"-{args.task}"))
    out.mkdir(parents=True, exist_ok=True)
    train_pairs, held_out = importlib.import_module(f"tunesmith.demo.{task['module']}").generate()
    held_out = held_out[: args.limit]
    sft_data = out / "sft-chosen.jsonl"
    sft_data.write_text("".join(json.dumps(r) + "\n" for r in sft_rows(train_pairs)), encoding="utf-8")

    results = earlier_results(out, args)
    base = load_for_inference(args.model)
    blocks = general_blocks(base.tokenizer, max_tokens=args.ppl_tokens)
    if "base" not in results:
        results = {"base": score_model(base.model, base.tokenizer, held_out, blocks, args), **results}
    del base
    print(f"base: {brief(results['base'], args.task)}", flush=True)
    arms = ["sft", *args.arms] if needs_sft_first(args.arms, out) else args.arms
    for arm in arms:
        config = load_config(REPO / "recipes" / task["recipe"], arm_overrides(arm, args, out, sft_data))
        start = time.perf_counter()
        run = train(config, progress=False, overwrite=True)
        took = time.perf_counter() - start
        loaded = load_for_inference(str(run.output_dir))
        results[arm] = {**score_model(loaded.model, loaded.tokenizer, held_out, blocks, args), "train_s": took,
                        "lr": config.train.lr}
        del loaded
        print(f"{arm}: {brief(results[arm], args.task)} ({took:.0f} s training)", flush=True)

    label = {**vars(args), "arms": list(results)[1:]}
    (out / "results.json").write_text(json.dumps({"args": label, "results": results}, indent=2), encoding="utf-8")
    print(table(results, args.task))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
