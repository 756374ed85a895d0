"""train.eval_steps / keep_best / save_total_limit: a run that overfits keeps its best checkpoint as the run's
weights (the last ones in last/), and the summary says which step won and why."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from tunesmith.config import load_config
from tunesmith.doctor.findings import read_findings
from tunesmith.errors import TunesmithError
from tunesmith.rundir import checkpoints
from tunesmith.training.run import train

from helpers import invoke, ok, write_jsonl

WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def overfit_run(tmp_path_factory, tiny_model_dir):
    """Full fine-tuning of the tiny model on 2 examples at a constant lr: eval loss falls to step 12 and then
    rises while train loss keeps falling (measured: 8.65, 6.21, 4.70, 4.49, 4.64, 4.79)."""
    from tunesmith.demo.booking import generate

    tmp = tmp_path_factory.mktemp("overfit")
    train_rows, held_out = generate(n_train=2, n_eval=8, seed=1)
    write_jsonl(tmp / "train.jsonl", train_rows)
    write_jsonl(tmp / "eval.jsonl", held_out)
    config = load_config({
        "model": str(tiny_model_dir),
        "data": {"train": str(tmp / "train.jsonl"), "eval": str(tmp / "eval.jsonl"), "max_length": 256},
        "method": {"name": "full"},
        "train": {"max_steps": 18, "batch_size": 4, "lr": 0.01, "warmup": 0, "scheduler": "constant", "logging_steps": 1,
                  "eval_steps": 3, "keep_best": "eval_loss", "bf16": False},
        "output_dir": str(tmp / "run"),
    })
    result = train(config, progress=False)
    return result.output_dir, result.summary


def _evals(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_the_kept_weights_are_the_best_checkpoint_by_the_logged_eval_loss(overfit_run):
    run, summary = overfit_run
    evals = _evals(run)
    best_step = min(evals, key=lambda e: e[1])[0]
    assert best_step < 18 and len(evals) == 6  # it overfits: the best is not the last
    assert summary["best"]["step"] == best_step and summary["best"]["metric"] == "eval_loss"
    assert summary["best"]["why"] == "lowest eval_loss of 6 evaluations" and summary["best"]["last"] == "last"
    kept = load_file(run / WEIGHTS)
    assert _same(kept, load_file(run / f"checkpoint-{best_step}" / WEIGHTS))
    last = load_file(run / "last" / WEIGHTS)
    assert _same(last, load_file(run / "checkpoint-18" / WEIGHTS)) and not _same(kept, last)


@pytest.mark.slow
def test_rotation_keeps_the_best_and_the_last_checkpoint(overfit_run):
    run, _ = overfit_run
    best_step = min(_evals(run), key=lambda e: e[1])[0]
    assert [c.name for c in checkpoints(run)] == [f"checkpoint-{best_step}", "checkpoint-18"]  # save_total_limit 2


@pytest.mark.slow
def test_the_doctor_names_overfitting_with_the_step_it_began(overfit_run):
    run, _ = overfit_run
    best_step = min(_evals(run), key=lambda e: e[1])[0]
    f = {f.code: f for f in read_findings(run)}["overfitting"]
    assert f.step == best_step and f"began at step {best_step}" in f.message
    for remedy in ("more dropout", "lower r", "NEFTune", "fewer epochs"):
        assert remedy in f.remedy
    assert f"overfitting began at step {best_step}" in ok(invoke("doctor", run))


def test_save_total_limit_one_still_keeps_the_best(tiny_recipe):
    raw = copy.deepcopy(tiny_recipe)
    raw["train"].update({"max_steps": 4, "eval_steps": 1, "keep_best": "eval_loss", "save_total_limit": 1})
    result = train(load_config(raw), progress=False)
    run, summary = result.output_dir, result.summary
    names = [c.name for c in checkpoints(run)]
    best = f"checkpoint-{summary['best']['step']}"
    assert best in names and "checkpoint-4" in names and len(names) == len({best, "checkpoint-4"})


@pytest.mark.parametrize("override, fragment", [
    (["train.keep_best=eval_loss", "train.eval_each_epoch=false"], "set train.eval_steps"),
    (["train.keep_best=loss"], "train.keep_best = 'loss' is invalid: must be one of 'eval_loss' or 'score'"),
    (["train.eval_steps=0"], "train.eval_steps"),
    (["train.save_total_limit=0"], "train.save_total_limit"),
])
def test_bad_best_checkpoint_options(tiny_recipe, override, fragment):
    with pytest.raises(TunesmithError, match=fragment.replace("(", r"\(").replace(".", r"\.")):
        load_config(tiny_recipe, override)


def test_keep_best_without_eval_data_is_refused_before_the_run_folder_exists(tiny_recipe, tmp_path):
    raw = copy.deepcopy(tiny_recipe)
    raw["data"].pop("eval")
    raw["data"]["eval_split"] = 0.0
    raw["train"]["keep_best"] = "eval_loss"
    with pytest.raises(TunesmithError, match="train.keep_best=eval_loss needs eval data"):
        train(load_config(raw), progress=False)
    assert not (tmp_path / "run").exists()


def test_keep_best_score_logs_the_task_score_and_keeps_its_best_checkpoint(tiny_recipe, monkeypatch):
    """The tiny random model scores 0 everywhere, so the scorer is scripted: 0.5 at step 2, 0.25 at step 4."""
    from tunesmith.training import task_score

    scripted = iter([0.5, 0.25])
    monkeypatch.setattr(task_score, "score_generations", lambda *a, **k: (next(scripted), []))
    raw = copy.deepcopy(tiny_recipe)
    raw["train"].update({"max_steps": 4, "eval_steps": 2, "keep_best": "score"})
    result = train(load_config(raw), progress=False)
    run = result.output_dir
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["eval_score"]) for r in rows if "eval_score" in r] == [(2, 0.5), (4, 0.25)]
    best = result.summary["best"]
    assert (best["step"], best["metric"], best["why"]) == (2, "eval_score", "highest eval_score of 2 evaluations")
    adapter = "adapter_model.safetensors"
    assert _same(load_file(run / adapter), load_file(run / "checkpoint-2" / adapter))
    assert _same(load_file(run / "last" / adapter), load_file(run / "checkpoint-4" / adapter))
