"""The real built-in model (SmolLM2-135M-Instruct): the cache conversion is exact, and the quickstart recipe
trains, evaluates and exports on it. Every test here is `slow` (about a minute in all on 2 CPU cores).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tunesmith.models import BUILTIN_MODELS, DEFAULT_MODEL, builtin_gguf_path, is_builtin_cached

from oracle import read_rows, right_json, script_answers

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "recipes" / "quickstart.yaml"
IM_END = "<|im_end|>"


@pytest.fixture(scope="module")
def probe(tokenizer):
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "New booking: Ana Silva / Lima / May 3 2025 / 2 guests."}],
        tokenize=False, add_generation_prompt=True,
    )
    return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]


def logits_of(model, ids):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def test_cached_model_equals_gguf(probe):
    from transformers import AutoModelForCausalLM

    from tunesmith.models import load_model, pull_builtin

    cached_dir = pull_builtin(DEFAULT_MODEL)  # converts once if the cache is cold
    assert is_builtin_cached(DEFAULT_MODEL)
    assert (cached_dir / "model.safetensors").is_file()
    cached = load_model(DEFAULT_MODEL)

    gguf = builtin_gguf_path(DEFAULT_MODEL)
    assert gguf.name == BUILTIN_MODELS[DEFAULT_MODEL].gguf_file
    straight = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)

    assert cached.config.tie_word_embeddings == straight.config.tie_word_embeddings
    a, b = logits_of(cached, probe), logits_of(straight, probe)
    assert a.abs().max() > 1  # real logits, not a zero model
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    """quickstart.yaml, 3 steps, a 4-row eval file (the trainer's own eval reads every eval row)."""
    from tunesmith.config import load_config
    from tunesmith.training.run import train

    tmp = tmp_path_factory.mktemp("quickstart")
    eval_rows = (REPO / "recipes" / "data" / "booking-eval.jsonl").read_text().splitlines()[:4]
    (tmp / "eval4.jsonl").write_text("\n".join(eval_rows) + "\n")
    config = load_config(QUICKSTART, [
        "train.max_steps=3",
        f"output_dir={tmp / 'run'}",
        "eval.limit=4",
        "eval.max_new_tokens=32",
        f"data.eval={tmp / 'eval4.jsonl'}",
        "train.eval_each_epoch=false",
        "train.batch_size=2",
        "train.save_steps=100",
    ])
    assert config.model == DEFAULT_MODEL
    return config, train(config, progress=False)


def test_quickstart_trains_and_evaluates(quickstart_run, monkeypatch):
    from tunesmith.evaluation.run import evaluate

    config, result = quickstart_run
    run = Path(config.output_dir)
    for name in ("adapter_config.json", "adapter_model.safetensors", "config.yaml", "metrics.jsonl",
                 "summary.json", "data_stats.json", "tokenizer.json"):
        assert (run / name).is_file(), name
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3
    assert summary["train_loss"] > 0 and summary["eval_loss"] > 0
    assert summary["data"]["train"]["examples"] == 600
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # quickstart logs every 5 steps, so 3 steps log no per-step loss; the end-of-training record has train_loss.
    assert [r["step"] for r in records if "train_loss" in r] == [3]
    assert any("eval_loss" in r for r in records)

    report = evaluate(str(run), progress=False)
    assert report["examples"] == 4
    assert report["scorer"] == "json_match"
    assert {"score", "eval_loss", "perplexity"} <= report.keys()

    # Scripted answers (tests/oracle.py): the quickstart's scorer gives its own eval references full marks, each
    # paired with its own prompt, and the real model's eval loss does not depend on what generation returns.
    rows = read_rows(config.data.eval)
    asked = script_answers(monkeypatch, rows, lambda model, i, row: right_json(row) if i != 1 else "I do not know.")
    scripted = evaluate(str(run), progress=False)
    assert asked == [0, 1, 2, 3]
    assert scripted["score"] == 0.75
    assert [s["reference"] for s in scripted["samples"]] == [r["output"] for r in rows]
    assert [s["score"] for s in scripted["samples"]] == [1.0, 0.0, 1.0, 1.0]
    assert scripted["eval_loss"] == report["eval_loss"]


def test_quickstart_export_merged_matches_adapter(quickstart_run, tmp_path, probe, tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunesmith.exporting import export
    from tunesmith.models import load_model

    config, result = quickstart_run
    out = export(str(result.output_dir), str(tmp_path / "merged"), merge=True)

    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(load_model(DEFAULT_MODEL), str(result.output_dir))
    base = load_model(DEFAULT_MODEL)

    got, want = logits_of(merged, probe), logits_of(with_adapter, probe)
    # 3 steps at lr 1e-3 move the logits by whole units (max ~4), far above the tolerance below.
    assert (want - logits_of(base, probe)).abs().max() > 0.1
    # Merging rounds W + s*B*A to fp32 once per layer; over 30 layers that leaves ~1e-4 on logits of ~30.
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-5)

    eos = merged.generation_config.eos_token_id
    assert tokenizer.convert_tokens_to_ids(IM_END) in (eos if isinstance(eos, list) else [eos])
