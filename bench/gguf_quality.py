"""Size on disk and held-out score of the demo model exported as GGUF f16, q8_0 and q4_0.

    .venv/bin/python bench/gguf_quality.py RUN [--limit N] [--out DIR]

RUN is a trained quickstart run (`make demo` writes runs/quickstart). Each quant is exported with
`tunesmith.exporting.gguf.export_gguf`, read back by transformers' GGUF loader (de-quantized to fp32, so the score
measures what the quantization lost, not a runtime), and scored with tunesmith's eval (greedy, the recipe's scorer
and max_new_tokens) on the run's held-out set; the merged fp32 model is the reference row.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch


def score(model, tokenizer, config, convs) -> float:
    from tunesmith.evaluation.run import score_generations

    value, _ = score_generations(model, tokenizer, convs, config.eval.scorer, config.eval.max_new_tokens,
                                 config.eval.batch_size, progress=False)
    return value


def main() -> None:
    from transformers import AutoModelForCausalLM

    from tunesmith.data.assemble import eval_conversations
    from tunesmith.exporting.gguf import export_gguf
    from tunesmith.exporting.merged import merged_model
    from tunesmith.rundir import load_run_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--limit", type=int, default=None, help="score the first N held-out examples (default: all)")
    parser.add_argument("--out", default=None, help="keep the exports here (default: a temporary folder)")
    parser.add_argument("--quants", nargs="+", default=["f16", "q8_0", "q4_0"])
    args = parser.parse_args()

    config = load_run_config(args.run)
    convs = eval_conversations(config)[:args.limit]
    root = Path(args.out or tempfile.mkdtemp(prefix="gguf-quality-"))
    model, tokenizer = merged_model(args.run, config)
    fp32_mib = sum(p.numel() * 4 for p in model.parameters()) / 2**20
    rows = [("merged fp32 (reference, in memory)", fp32_mib, score(model, tokenizer, config, convs))]
    del model
    for quant in args.quants:
        path = export_gguf(args.run, str(root / quant), quant=quant, overwrite=True)
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
        rows.append((f"GGUF {quant}", path.stat().st_size / 2**20, score(loaded, tokenizer, config, convs)))
        del loaded
    print(f"| model | size on disk (MiB) | held-out {config.eval.scorer} ({len(convs)} examples) |")
    print("| --- | ---: | ---: |")
    for name, mib, value in rows:
        print(f"| {name} | {mib:.1f} | {value:.0%} |")
    print(f"exports in {root}")


if __name__ == "__main__":
    main()
