"""bench/preference_experiment.py end to end on the tiny model: every arm trains, is scored, and lands in
results.json and the table (the numbers themselves are the real-model run's, in the README)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "preference_experiment.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("preference_experiment", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sft_arm_learns_the_chosen_answers():
    rows = [{"prompt": "What is 2 plus 2?", "chosen": "4.", "rejected": "Great question! 2 plus 2 is 4.", "answer": "4"}]
    assert load_bench().sft_rows(rows) == [{"instruction": "What is 2 plus 2?", "output": "4."}]


@pytest.mark.slow
def test_every_arm_trains_and_is_scored_on_the_tiny_model(tmp_path, tiny_model_dir, capsys):
    bench = load_bench()
    out = tmp_path / "exp"
    assert bench.main(["--model", str(tiny_model_dir), "--steps", "1", "--batch-size", "2", "--limit", "2",
                       "--max-new-tokens", "4", "--ppl-tokens", "256", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())["results"]
    assert list(results) == ["base", "sft", "dpo", "orpo", "simpo"]
    for arm in ("sft", "dpo", "orpo", "simpo"):
        assert (out / arm / "adapter_model.safetensors").exists()
        assert json.loads((out / arm / "summary.json").read_text())["steps"] == 1
    for r in results.values():
        assert 0.0 <= r["concise_rate"] <= 1.0 and r["perplexity"] > 1 and len(r["replies"]) == 2
    assert capsys.readouterr().out.count("\n| ") == 6  # header rule and five models
