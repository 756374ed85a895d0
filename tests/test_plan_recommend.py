"""The recommender and the `tunesmith plan` command (fast: pure arithmetic), and the measurement
against a real run (slow: the built-in model)."""
from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from tunesmith.cli import app
from tunesmith.config import load_config
from tunesmith.sizes import GiB
from tunesmith.planning.recommend import recommend

runner = CliRunner()


def test_recommend_walks_the_tree_with_real_numbers():
    rec = recommend("llama-3.1-8b", "24GiB", seq_len=2048, precision="amp", device="cuda")
    by = {o.label: o for o in rec.options}
    assert not by["full fine-tuning"].fits and "> 21.60 GiB" in by["full fine-tuning"].reason
    # train stores an adapter method's frozen base in bf16: LoRA r=16 on 8B fits 24 GiB (fp32 did not: 30 GiB)
    assert rec.chosen.label == "lora r=16" and rec.chosen.bill.setup["precision"] == "bf16"
    assert rec.chosen.bill.total <= 24 * GiB * 0.9
    assert by["full fine-tuning"].bill.setup["precision"] == "amp"
    cfg = load_config(rec.recipe)  # the printed recipe is one `tunesmith train` accepts
    assert cfg.method.name == "lora" and cfg.train.bf16 is True and cfg.model == "meta-llama/Llama-3.1-8B-Instruct"
    assert cfg.train.batch_size * cfg.train.grad_accum >= 16
    assert yaml.safe_load(rec.yaml) == rec.recipe


def test_recommend_prefers_full_when_it_fits_and_lora_for_many_tasks():
    rec = recommend("smollm2-135m-instruct", "16GiB", seq_len=512, precision="fp32", device="cpu")
    assert rec.chosen.label == "full fine-tuning"
    assert rec.recipe["model"] == "smollm2-135m-instruct"
    multi = recommend("smollm2-135m-instruct", "16GiB", seq_len=512, multi_task=True, precision="fp32", device="cpu")
    assert multi.chosen.label == "lora r=64"
    full = next(o for o in multi.options if o.label == "full fine-tuning")
    assert full.fits and "one adapter per task" in full.reason


def test_recommend_nothing_fits():
    rec = recommend("llama-3.1-70b", "8GiB", seq_len=4096, precision="amp", device="cuda")
    assert rec.chosen is None and rec.recipe is None
    assert all(not o.fits for o in rec.options)


def test_recommend_uses_checkpointing_only_when_needed():
    rec = recommend("qwen2.5-0.5b", "12GiB", seq_len=4096, precision="amp", device="cuda")
    s = rec.chosen.bill.setup
    no_ckpt = [o for o in rec.options if o.fits and not o.bill.setup["checkpointing"]]
    assert s["checkpointing"] == (not any(o is rec.chosen for o in no_ckpt))


def test_cli_plan_bill_json():
    r = runner.invoke(app, ["plan", "--model", "llama-3.1-8b", "--method", "lora", "--rank", "16",
                            "--precision", "bf16", "--device", "cuda", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)["bill"]
    assert d["trainable_params"] == 41_943_040
    keys = [l["key"] for l in d["lines"]]
    for key in ("weights", "trainable", "gradients", "optimizer", "master", "activations", "logits", "overhead"):
        assert key in keys
    assert any("q_proj and v_proj only 6,815,744" in n for n in d["notes"])


def test_cli_plan_targets_and_table():
    r = runner.invoke(app, ["plan", "--model", "llama-3.1-8b", "--method", "lora", "--rank", "16",
                            "--targets", "q_proj,v_proj", "--explain", "--budget", "80GB", "--device", "cuda"])
    assert r.exit_code == 0, r.output
    assert "6,815,744" in r.output and "fits" in r.output
    assert "Adam keeps two running averages" in r.output  # --explain adds the why


def test_cli_plan_does_not_fit_exits_2():
    r = runner.invoke(app, ["plan", "--model", "llama-3.1-70b", "--method", "full", "--budget", "80GB",
                            "--device", "cuda", "--precision", "bf16"])
    assert r.exit_code == 2
    assert "does not fit" in r.output


def test_cli_plan_recommends_with_budget_only():
    r = runner.invoke(app, ["plan", "--model", "llama-3.1-8b", "--budget", "24GiB", "--device", "cuda", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["chosen"] == "lora r=16"  # the frozen base in bf16 (with --budget 12GiB it would be qlora)
    assert any(o["label"] == "full fine-tuning" and not o["fits"] for o in d["options"])
    r = runner.invoke(app, ["plan", "--model", "llama-3.1-8b", "--budget", "24GiB", "--device", "cuda"])
    assert "method:" in r.output and "tunesmith train" in r.output


@pytest.mark.parametrize("args,message", [
    (["--method", "nope"], "method.name"),
    (["--method", "full", "--rank", "8"], "--rank does not apply"),
    (["--method", "lora", "--budget", "huge"], "24GiB"),
    (["--method", "lora", "--precision", "fp8"], "precision"),
    (["--model", "gpt-9"], "not a bundled config"),
    (["--method", "lora", "--targets", "c_attn"], "matches no linear layer"),
])
def test_cli_plan_errors(args, message):
    r = runner.invoke(app, ["plan", *args])
    assert r.exit_code == 1
    assert message in r.output


# ---- the trainer that is measured is the trainer that trains ---------------------------------------
def test_measure_builds_the_trainer_train_builds(tiny_recipe, monkeypatch):
    """`plan --measure` and `train` both get their MethodTrainer from training.run.build_trainer, so the
    measured step runs the same arguments, collator (and padding id), loss path and optimizer groups."""
    import tunesmith.training.run as training_run
    from tunesmith.planning.measure import measure

    built = []

    def spy(*args, **kwargs):
        built.append(real(*args, **kwargs))
        return built[-1]

    real = training_run.build_trainer
    monkeypatch.setattr(training_run, "build_trainer", spy)
    tiny_recipe["train"].update(max_steps=1, batch_size=2, padding_free=False)
    tiny_recipe["data"].pop("eval")
    config = load_config(tiny_recipe)
    training_run.train(config, progress=False)
    measure(config, seq_len=16, batch=2, steps=1, live_memory=False)
    trained, measured = built

    def shape(t):
        a = t.args
        groups = [(len(g["params"]), g.get("weight_decay")) for g in t.create_optimizer().param_groups]
        return (type(t.data_collator), t.data_collator.pad_token_id, t.selective_loss, a.per_device_train_batch_size,
                a.gradient_accumulation_steps, a.learning_rate, a.weight_decay, a.activation_checkpointing, groups)

    assert shape(measured) == shape(trained)
    assert trained.data_collator.pad_token_id is not None


def test_measure_writes_no_checkpoint(tiny_recipe, monkeypatch):
    """A measurement keeps nothing, so the Trainer's end-of-run checkpoint (weights and optimizer state, 0.7 GB
    for full fine-tuning of the built-in model) is never written."""
    from tunesmith.planning.measure import measure
    from tunesmith.training.trainer import MethodTrainer

    def refuse(self, model, trial):
        raise AssertionError("measure saved a checkpoint")

    monkeypatch.setattr(MethodTrainer, "_save_checkpoint", refuse)
    tiny_recipe["data"].pop("eval")
    m = measure(load_config(tiny_recipe), seq_len=16, batch=2, steps=2, live_memory=False)
    assert m.seconds_per_step > 0  # it trained (peak RSS in a warm test process can read 0)


# ---- measured ------------------------------------------------------------------------------------
# Peak RSS is a property of a whole process; a long test session's heap would blur it, so each
# measurement runs in a fresh interpreter, as `tunesmith plan --measure` does.
def in_fresh_process(code: str) -> dict:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full"])
def test_measured_peak_matches_the_bill_on_the_builtin_model(method):
    m = in_fresh_process(f"""
import json
from tunesmith.quiet import quiet_libraries
quiet_libraries()
from tunesmith.config import load_config
from tunesmith.planning.measure import measure
cfg = load_config({{"model": "smollm2-135m-instruct", "data": {{"train": "x"}}, "method": {{"name": "{method}"}},
                   "train": {{"bf16": False}}}})
print(json.dumps(measure(cfg, seq_len=64, batch=1, steps=2).as_dict()))
""")
    assert m["measured_bytes"] > 0 and m["seconds_per_step"] > 0
    assert abs(m["error"]) <= 0.075, m  # the README's "worst |error| 7.5%" (bench/plan_accuracy.py)


@pytest.mark.slow
def test_train_dry_run_prints_stats_bill_and_measurement(tiny_recipe, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe))
    d = in_fresh_process(f"""
import json, sys
from typer.testing import CliRunner
from tunesmith.cli import app
r = CliRunner().invoke(app, ["train", {str(path)!r}, "--dry-run", "--json"])
assert r.exit_code == 0, r.output
print(json.dumps(json.loads(r.output)))
""")
    assert d["data"]["train"]["examples"] > 0
    assert d["measurement"]["measured_bytes"] > 0 and d["measurement"]["seconds_per_step"] > 0
    # A 64-wide model is mostly fixed process overhead; the README's 7.5% bound is for the bench's models.
    assert abs(d["measurement"]["error"]) <= 0.15
    assert not (tmp_path / "run").exists()  # a dry run writes no run folder


@pytest.mark.slow
def test_peak_rss_tracker_sees_a_short_lived_allocation():
    d = in_fresh_process("""
import json, torch
from tunesmith.planning.measure import PeakRSS, keep_rss_live, rss
keep_rss_live()
before = rss()
tracker = PeakRSS()
x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
del x
print(json.dumps({"peak": tracker.peak() - before, "after": rss() - before}))
""")
    assert d["peak"] >= 60 * 2**20
    assert d["after"] < 32 * 2**20  # handed back: RSS follows the live tensors
