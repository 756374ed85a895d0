"""The doctor: each detector provoked for real on the tiny model (and checked on hand-written metrics rows),
asserting the finding, the step it names and the guide's remedy; `tunesmith doctor RUN` for finished and
crashed runs."""
from __future__ import annotations

import copy
import json
import math

import pytest

from tunesmith.config import load_config
from tunesmith.doctor.answers import repeats, runaway_answers
from tunesmith.doctor.callback import DoctorStopped
from tunesmith.doctor.detectors import (
    RunFacts, grad_norm_explosion, loss_diverged, loss_not_falling, non_finite_loss, overfitting,
)
from tunesmith.doctor.findings import Finding, read_findings
from tunesmith.rundir import checkpoints
from tunesmith.training.run import train

from helpers import fails, invoke, ok

LORA = RunFacts(lr=2e-4, adapter=True)

NO_END_MARKER = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


def rows(losses, grads=None, evals=()):
    out = [{"step": i + 1, "loss": v, "grad_norm": (grads or [0.5] * len(losses))[i]} for i, v in enumerate(losses)]
    return out + [{"step": s, "eval_loss": v} for s, v in evals]


# ---- detectors on hand-written rows -----------------------------------------------------------------

def test_non_finite_loss_names_the_first_bad_step_and_the_learning_rate():
    f = non_finite_loss(rows([2.0, 1.9, float("nan"), float("nan")]), RunFacts(lr=10.0))
    assert f.fatal and f.step == 3 and "nan" in f.message
    assert "learning rate" in f.cause and "above the guide's 1e-4..5e-4 range" in f.cause
    assert non_finite_loss(rows([2.0, 1.9, 1.8]), LORA) is None


def test_loss_diverged_above_twice_ln_vocab():
    facts = RunFacts(lr=10.0, vocab_size=1000)  # 2 ln 1000 = 13.8155
    assert loss_diverged(rows([6.9, 13.8]), facts) is None
    f = loss_diverged(rows([6.9, 7.0, 13.9]), facts)
    assert f.fatal and f.step == 3 and "13.8" in f.message


def test_flat_loss_is_found_after_the_warm_up_share_and_falling_loss_is_not():
    flat = loss_not_falling(rows([3.0, 3.01, 2.99, 3.0, 3.02, 3.0, 2.995, 3.0]), RunFacts(lr=1e-6), supervised_per_step=40)
    assert flat is not None and "not falling" in flat.message
    assert "below the guide's 1e-4..5e-4 range" in flat.cause and "40 supervised tokens" in flat.cause
    assert loss_not_falling(rows([3.0, 2.9, 2.7, 2.5, 2.3, 2.1, 2.0, 1.9]), LORA) is None
    masked = loss_not_falling(rows([3.0] * 8), LORA, supervised_per_step=0)
    assert "every label is masked" in masked.cause


def test_grad_norm_explosion_against_the_median_before_it():
    f = grad_norm_explosion(rows([2.0] * 5, grads=[0.5, 0.4, 0.6, 7.0, 0.5]), LORA)  # median(0.5, 0.4, 0.6) = 0.5
    assert f.step == 4 and "14x" in f.message
    assert grad_norm_explosion(rows([2.0] * 5, grads=[0.5, 0.4, 0.6, 0.9, 0.5]), LORA) is None
    assert grad_norm_explosion(rows([2.0] * 2, grads=[0.01, 0.5]), LORA) is None  # below the clip norm 1.0


def test_overfitting_names_the_step_of_the_lowest_eval_loss():
    r = rows([3.0, 2.5, 2.0, 1.5, 1.0, 0.5], evals=[(2, 2.8), (4, 2.6), (5, 2.7), (6, 2.9)])
    f = overfitting(r, LORA)
    assert f.step == 4 and "began at step 4" in f.message
    for remedy in ("dropout", "lower r", "NEFTune", "fewer epochs"):
        assert remedy in f.remedy
    # eval loss still falling, or rising only once: not overfitting
    assert overfitting(rows([3.0, 2.5, 2.0, 1.5], evals=[(2, 2.8), (3, 2.6), (4, 2.5)]), LORA) is None
    assert overfitting(rows([3.0, 2.5, 2.0, 1.5], evals=[(2, 2.8), (3, 2.6), (4, 2.7)]), LORA) is None


def test_runaway_answers_name_the_data_cause_when_the_end_of_turn_is_unsupervised():
    samples = [{"prediction": "a b c", "stopped": False}] * 3 + [{"prediction": "ok", "stopped": True}]
    eot = Finding(code="end_of_turn_unsupervised", message="4 of 4 training examples end without ...", remedy="")
    f = runaway_answers(samples, 16, eot)
    assert "3 of 4 answers hit max_new_tokens=16" in f.message and "the data" in f.cause
    assert "data.chat_template" in f.remedy
    other = runaway_answers(samples, 16, None)
    assert "supervises the end of turn" in other.cause and "left padding" in other.remedy
    assert runaway_answers([{"prediction": "ok", "stopped": True}] * 3, 16, None) is None


def test_repeats_sees_a_looping_answer():
    assert repeats("the cat sat " * 6)
    assert not repeats("one two three four five six seven eight nine ten eleven")


# ---- provoked for real on the tiny model ------------------------------------------------------------

def _cfg(tiny_recipe, method=None, **train_section):
    raw = copy.deepcopy(tiny_recipe)
    raw["train"].update({"logging_steps": 1, "eval_each_epoch": False, "warmup": 0, **train_section})
    if method:
        raw["method"] = method
    return load_config(raw)


def test_lr_10_stops_at_the_last_good_checkpoint_with_the_bad_steps_examples(tiny_recipe, tokenizer):
    # full fine-tuning at lr=10: the warm-up's first step has lr 0 (weights unchanged), the second lr 5 wrecks them
    config = _cfg(tiny_recipe, {"name": "full"}, lr=10, warmup=2, save_steps=1, max_steps=6)
    with pytest.raises(DoctorStopped) as stopped:
        train(config, progress=False)
    run = tiny_recipe["output_dir"]
    assert "learning rate" in str(stopped.value) and "the last good checkpoint is checkpoint-1" in str(stopped.value)
    metrics = [json.loads(line) for line in open(f"{run}/metrics.jsonl")]
    bad = next(r["step"] for r in metrics if "loss" in r and r["loss"] > 2 * math.log(len(tokenizer)))
    assert [c.name for c in checkpoints(run)] == ["checkpoint-1"]  # later ones set aside as .suspect-
    fatal = read_findings(run)[0]
    assert fatal.fatal and fatal.code == "loss_diverged" and fatal.step == bad
    assert len(fatal.example_ids) == 4 and all(e.startswith(tiny_recipe["data"]["train"] + ":") for e in fatal.example_ids)
    assert "lower train.lr" in fatal.remedy
    text = ok(invoke("doctor", run))
    assert "[fatal] loss diverged" in text and "remedy: lower train.lr" in text


def test_a_nan_loss_stops_training_and_names_the_step(tiny_recipe):
    config = _cfg(tiny_recipe, {"name": "full"}, lr=1e20, warmup=2, save_steps=1, max_steps=4)
    with pytest.raises(DoctorStopped, match="became nan at step 3"):
        train(config, progress=False)
    fatal = read_findings(tiny_recipe["output_dir"])[0]
    assert fatal.code == "loss_not_finite" and fatal.step == 3 and "learning rate" in fatal.cause


def test_flat_loss_at_a_tiny_learning_rate(tiny_recipe):
    train(_cfg(tiny_recipe, lr=1e-7, max_steps=8), progress=False)
    found = {f.code: f for f in read_findings(tiny_recipe["output_dir"])}
    f = found["loss_not_falling"]
    assert "train.lr=1e-07 is below the guide's 1e-4..5e-4 range" in f.cause and "supervised tokens" in f.cause


def test_grad_norm_explosion_at_lr_10_with_lora(tiny_recipe):
    train(_cfg(tiny_recipe, lr=10, max_steps=3), progress=False)
    found = {f.code: f for f in read_findings(tiny_recipe["output_dir"])}
    assert found["grad_norm_explosion"].step == 2 and "above the guide's" in found["grad_norm_explosion"].cause


def test_runaway_answers_traced_to_an_unsupervised_end_of_turn(tiny_recipe):
    raw = copy.deepcopy(tiny_recipe)
    raw["data"]["chat_template"] = NO_END_MARKER
    raw["train"]["max_steps"] = 1
    run = raw["output_dir"]
    train(load_config(raw), progress=False)
    assert "end_of_turn_unsupervised" in {f.code for f in read_findings(run)}  # said before step 1
    ok(invoke("eval", run, "--json"))
    found = {f.code: f for f in read_findings(run)}
    runaway = found["runaway_answers"]
    assert "answers hit max_new_tokens=8 without the end-of-turn token" in runaway.message
    assert runaway.cause.startswith("the data:") and "never learned to stop" in runaway.cause
    assert "data.chat_template" in runaway.remedy
    assert "runaway_answers" in json.load(open(f"{run}/eval.json"))["doctor"][0]["code"]


def test_doctor_command_on_a_clean_run_and_on_a_bad_path(tiny_recipe, tmp_path):
    train(load_config(tiny_recipe), progress=False)
    assert ok(invoke("doctor", tiny_recipe["output_dir"], "--json")).strip().startswith("[")
    fails(invoke("doctor", tmp_path / "nowhere"), "is not a tunesmith run folder")
