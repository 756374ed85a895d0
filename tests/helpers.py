"""Helpers shared by tests: tiny random models and data files."""
from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path


def build_tiny_llama(out: Path, tokenizer, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """A random Llama with the built-in tokenizer, saved as a local model folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def invoke(*args, input: str | None = None):
    """Run the `tunesmith` CLI in-process; stdout and stderr stay apart."""
    from typer.testing import CliRunner

    from tunesmith.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], input=input)


def ok(result) -> str:
    assert result.exit_code == 0, f"exit {result.exit_code}\nstdout: {result.stdout}\nstderr: {result.stderr}\n{result.exception!r}"
    return result.stdout


def fails(result, *fragments: str) -> str:
    """Exit 1 through SystemExit, one line on stderr holding every fragment, no traceback anywhere."""
    assert result.exit_code == 1, f"exit {result.exit_code}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, f"{fragment!r} not in stderr: {result.stderr}"
    return result.stderr


def task_recipe(tmp: Path, model_dir, name: str, rows: list[dict], held: list[dict], prefix: str, *,
                steps: int = 2, eval_section: dict | None = None, **extra) -> dict:
    """A LoRA recipe on the tiny model for one task (its rows written under tmp, its task prefix), as the
    continual and serving tests train them; `extra` adds or replaces top-level keys."""
    write_jsonl(tmp / f"{name}-train.jsonl", rows)
    write_jsonl(tmp / f"{name}-eval.jsonl", held)
    return {
        "model": str(model_dir),
        "data": {"train": str(tmp / f"{name}-train.jsonl"), "eval": str(tmp / f"{name}-eval.jsonl"),
                 "max_length": 256, "task_prefix": prefix},
        "method": {"name": "lora", "r": 4, "alpha": 8},
        "train": {"max_steps": steps, "batch_size": 4, "lr": 1e-2, "bf16": False, "eval_each_epoch": False},
        "eval": {"scorer": "exact_match", "batch_size": 4, **(eval_section or {})},
        "output_dir": str(tmp / name),
        **extra,
    }


def keep_mask(x, p: float):
    """The fused LoRA branch's dropout mask as a bool tensor (the same random draws as `keep_bits`), for
    references that apply dropout as x * mask / keep."""
    from tunesmith.methods.fused_lora import keep_bits

    bits, keep = keep_bits(x, p)
    return bits != 0, keep


def peft_model_with_random_b(tiny_model_dir, dropout: float, use_dora: bool = False):
    """The tiny model under PEFT LoRA (or DoRA) on every linear, B drawn non-zero so every gradient is exercised."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear", use_dora=use_dora,
                        init_lora_weights="gaussian", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    return peft_model


def tree(*roots: Path) -> dict[str, str]:
    """sha256 of every file and a marker for every folder (hidden ones too) under `roots`."""
    found = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            found[str(p)] = "folder" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return found


def saved_bytes(model, ids) -> int:
    """Bytes autograd keeps for backward during one forward of a PEFT model's decoder body (each storage counted
    once; the lm_head's logits would swamp the comparison)."""
    import torch

    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.get_base_model().model(input_ids=ids).last_hidden_state.sum()
    return sum(storages.values())


def load_bench(name: str):
    """A bench/ script imported as a module (bench/ is not a package)."""
    path = Path(__file__).resolve().parent.parent / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
