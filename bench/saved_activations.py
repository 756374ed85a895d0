"""Activations autograd keeps for backward: PEFT's LoRA forward against tunesmith's fused LoRA branch.

    .venv/bin/python bench/saved_activations.py

The built-in model with the quickstart recipe's LoRA (r=16, dropout 0.05, all seven projections), one
micro batch of the first quickstart examples laid in one padding-free row (about 493 tokens, as in the
speed benchmark). Counts every storage autograd saves during the decoder body's forward (the lm_head is
left out: tunesmith's selective loss never builds full logits). Byte counts, not timings: the machine's
load does not change them.
"""
from __future__ import annotations

import argparse

import torch


def saved_bytes(model, ids: torch.Tensor) -> int:
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.get_base_model().model(input_ids=ids).last_hidden_state.sum()
    return sum(storages.values())


def main() -> None:
    from tunesmith.config import load_config
    from tunesmith.data.assemble import prepare_data
    from tunesmith.methods import load_kwargs, prepare_model
    from tunesmith.methods.fused_lora import use_fused_lora
    from tunesmith.models import load_model, load_tokenizer
    from tunesmith.quiet import quiet_libraries

    quiet_libraries()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=4, help="examples laid in the one row (default 4)")
    args = p.parse_args()
    cfg = load_config("recipes/quickstart.yaml", ["train.bf16=false"])
    tokenizer = load_tokenizer(cfg.model)
    row = [t for ex in prepare_data(cfg, tokenizer).train[: args.examples] for t in ex.input_ids]
    ids = torch.tensor([row])
    result = {}
    for name in ("peft", "fused"):
        torch.manual_seed(0)
        model = load_model(cfg.model, **load_kwargs(cfg))
        model.config.use_cache = False
        prepared = prepare_model(model, cfg, total_steps=1)
        if name == "fused":
            use_fused_lora(prepared.model)
        prepared.model.train()
        result[name] = saved_bytes(prepared.model, ids)
    mib = {k: v / 2**20 for k, v in result.items()}
    print(f"tokens in the row: {ids.shape[1]}")
    print(f"PEFT LoRA forward: {mib['peft']:.0f} MiB saved for backward")
    print(f"fused LoRA branch: {mib['fused']:.0f} MiB saved for backward ({mib['fused'] / mib['peft'] - 1:+.0%})")


if __name__ == "__main__":
    main()
