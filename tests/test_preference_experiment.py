"""bench/preference_experiment.py end to end on the tiny model: every arm trains, is scored, and lands in
results.json and the table (the numbers themselves are the real-model run's, in the README)."""
from __future__ import annotations

import json

import pytest

from helpers import load_bench


def test_sft_arm_learns_the_chosen_answers():
    rows = [{"prompt": "What is 2 plus 2?", "chosen": "4.", "rejected": "Great question! 2 plus 2 is 4.", "answer": "4"}]
    assert load_bench("preference_experiment").sft_rows(rows) == [{"instruction": "What is 2 plus 2?", "output": "4."}]


@pytest.mark.slow
def test_every_arm_trains_and_is_scored_on_the_tiny_model(tmp_path, tiny_model_dir, capsys):
    bench = load_bench("preference_experiment")
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


def test_follow_up_arms_train_from_the_merged_sft_run(tmp_path):
    import argparse

    bench = load_bench("preference_experiment")
    args = argparse.Namespace(model="m", steps=3, batch_size=2, lr=5e-4, follow_up_lr=1e-4)
    sets = bench.arm_overrides("sft+dpo", args, tmp_path, tmp_path / "sft-chosen.jsonl")
    assert "train.objective=dpo" in sets and "continual.strategy=merge" in sets
    assert f"continual.previous=[{(tmp_path / 'sft').resolve()}]" in sets
    assert [s for s in sets if s.startswith("train.lr=")][-1] == "train.lr=0.0001"  # the last --set wins
    assert "preference.gamma=0.5" in bench.arm_overrides("sft+simpo", args, tmp_path, tmp_path / "x.jsonl")


def test_follow_up_arms_reuse_a_trained_sft_run(tmp_path):
    bench = load_bench("preference_experiment")
    assert bench.needs_sft_first(["sft+dpo"], tmp_path)
    assert not bench.needs_sft_first(["dpo"], tmp_path) and not bench.needs_sft_first(["sft", "sft+dpo"], tmp_path)
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "adapter_model.safetensors").write_bytes(b"")
    assert not bench.needs_sft_first(["sft+simpo"], tmp_path)


def test_earlier_results_kept_only_for_the_same_settings(tmp_path):
    import argparse

    bench = load_bench("preference_experiment")
    settings = {"task": "refusal", "model": "m", "steps": 30, "batch_size": 8, "lr": None, "limit": 100,
                "max_new_tokens": 48, "ppl_tokens": 8192}
    assert bench.earlier_results(tmp_path, argparse.Namespace(**settings)) == {}
    (tmp_path / "results.json").write_text(json.dumps({"args": {**settings, "arms": ["sft"]},
                                                       "results": {"base": {"perplexity": 2.0}}}))
    assert bench.earlier_results(tmp_path, argparse.Namespace(**settings)) == {"base": {"perplexity": 2.0}}
    assert bench.earlier_results(tmp_path, argparse.Namespace(**{**settings, "steps": 2})) == {}
