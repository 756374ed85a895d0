"""The `tunesmith` command line through typer's CliRunner: output formats, exit codes and error messages.

Recipes are YAML files in tmp_path that point at the tiny random Llama from conftest.
"""
from __future__ import annotations

import json

import pytest
import yaml

from helpers import fails, invoke, ok, write_jsonl

IM_END = "<|im_end|>"
ROLE_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
NO_ROLES_TEMPLATE = "{% for m in messages %}{{ m['content'] }}<|im_end|>\n{% endfor %}"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_model_dir):
    """A recipe (relative data paths) for the tiny model, and the rows it reads."""
    from tunesmith.demo.booking import generate

    tmp = tmp_path_factory.mktemp("cli")
    train_rows, eval_rows = generate(n_train=8, n_eval=4, seed=1)
    write_jsonl(tmp / "train.jsonl", train_rows)
    write_jsonl(tmp / "eval.jsonl", eval_rows)
    recipe = {
        "model": str(tiny_model_dir),
        "data": {"train": "train.jsonl", "eval": "eval.jsonl", "format": "alpaca", "max_length": 256},
        "method": {"name": "lora", "r": 4, "alpha": 8},
        "train": {"batch_size": 4, "lr": 1e-3, "logging_steps": 1, "save_steps": 1, "bf16": False,
                  "eval_each_epoch": False},
        "eval": {"scorer": "json_match", "max_new_tokens": 4, "batch_size": 4, "limit": 2},
        "output_dir": str(tmp / "run"),
    }
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return {"dir": tmp, "recipe": path, "train_rows": train_rows, "run": tmp / "run"}


@pytest.fixture(scope="module")
def trained_run(workdir):
    out = ok(invoke("train", workdir["recipe"], "--max-steps", "2", "--json"))
    summary = json.loads(out)
    assert summary["output_dir"] == str(workdir["run"])
    assert summary["steps"] == 2
    assert {"train_loss", "eval_loss", "tokens_per_second", "trainable_parameters"} <= summary.keys()
    assert (workdir["run"] / "adapter_model.safetensors").is_file()
    return workdir["run"]


# --- models / config ------------------------------------------------------------------------------


def test_models_list_json():
    rows = json.loads(ok(invoke("models", "list", "--json")))
    names = [r["name"] for r in rows]
    assert "smollm2-135m-instruct" in names
    for r in rows:
        assert {"name", "description", "installed", "cached", "cache_dir"} <= r.keys()
        assert isinstance(r["installed"], bool) and isinstance(r["cached"], bool)


def test_config_show_prints_override(workdir):
    out = ok(invoke("config", "show", workdir["recipe"], "--set", "train.lr=0.01"))
    shown = yaml.safe_load(out)
    assert shown["train"]["lr"] == 0.01
    assert "  lr: 0.01\n" in out
    # Every default is filled in, and relative data paths are resolved against the recipe.
    assert shown["train"]["scheduler"] == "cosine"
    assert shown["data"]["train"] == str(workdir["dir"] / "train.jsonl")

    as_json = json.loads(ok(invoke("config", "show", workdir["recipe"], "--set", "train.lr=0.01", "--json")))
    assert as_json["train"]["lr"] == 0.01


# --- data -----------------------------------------------------------------------------------------


def test_data_inspect_json(workdir):
    report = json.loads(ok(invoke("data", "inspect", workdir["recipe"], "--n", "1", "--json")))
    assert list(report) == ["examples"]
    assert len(report["examples"]) == 1
    example = report["examples"][0]
    assert example["index"] == 0
    tokens = example["tokens"]
    assert tokens and all(set(t) == {"id", "text", "loss"} for t in tokens)
    assert all(isinstance(t["id"], int) and isinstance(t["loss"], bool) for t in tokens)
    supervised = "".join(t["text"] for t in tokens if t["loss"])
    assert supervised == workdir["train_rows"][0]["output"] + IM_END
    # The prompt is in the table but carries no loss.
    assert workdir["train_rows"][0]["input"] in "".join(t["text"] for t in tokens if not t["loss"])


def test_data_stats_json(workdir):
    stats = json.loads(ok(invoke("data", "stats", workdir["recipe"], "--json")))
    assert stats["train"]["rows"] == 8 and stats["train"]["examples"] == 8
    assert stats["eval"]["rows"] == 4 and stats["eval"]["examples"] == 4
    assert 0 < stats["train"]["supervised_share"] < 1
    assert stats["train"]["length_max"] <= 256


def test_data_check_passes_on_good_data(workdir):
    out = ok(invoke("data", "check", workdir["recipe"]))
    assert "check passed" in out
    assert "error" not in out
    report = json.loads(ok(invoke("data", "check", workdir["recipe"], "--json")))
    assert report["ok"] is True


def test_data_check_malformed_jsonl_line(workdir, tmp_path):
    lines = (workdir["dir"] / "train.jsonl").read_text().splitlines()
    lines[2] = lines[2][: len(lines[2]) // 2]  # line 3 cut in half
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    result = invoke("data", "check", workdir["recipe"], "--set", f"data.train={bad}")
    assert result.exit_code == 1
    assert f"error data.train: {bad}:3: not valid JSON" in result.stdout
    assert "fix or remove this line" in result.stdout
    assert "check failed" in result.stdout
    assert "Traceback" not in result.output


def test_data_check_template_without_end_of_turn(workdir):
    result = invoke("data", "check", workdir["recipe"], "--set", f"data.chat_template={ROLE_TEMPLATE}")
    assert result.exit_code == 1, result.stdout
    train_file = workdir["dir"] / "train.jsonl"
    for line in range(1, 9):
        assert (f"error {train_file}:{line}: the last assistant turn's end-of-turn token carries no loss: "
                "the model will not learn to stop") in result.stdout
    assert "renders user and assistant messages the same way" not in result.stdout  # roles are marked
    assert "check failed" in result.stdout


def test_data_check_template_without_roles(workdir):
    result = invoke("data", "check", workdir["recipe"], "--set", f"data.chat_template={NO_ROLES_TEMPLATE}")
    assert result.exit_code == 1, result.stdout
    assert ("error chat template: the template renders user and assistant messages the same way, so the model "
            "cannot tell who speaks; set data.chat_template to a template that marks roles") in result.stdout
    assert "check failed" in result.stdout


# --- train / eval / chat / export -----------------------------------------------------------------


def test_train_writes_run(trained_run):
    assert (trained_run / "summary.json").is_file()
    assert json.loads((trained_run / "summary.json").read_text())["steps"] == 2
    assert sorted(p.name for p in trained_run.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]


def test_eval_json(workdir, trained_run, monkeypatch):
    from oracle import read_rows, right_json, script_answers, wrong_json

    rows = read_rows(workdir["dir"] / "eval.jsonl")
    # Scripted answers (tests/oracle.py): row 0 right, row 1 one guest off.
    script_answers(monkeypatch, rows, lambda model, i, row: wrong_json(row) if i else right_json(row))
    report = json.loads(ok(invoke("eval", trained_run, "--json")))
    assert report["model"] == str(trained_run)
    assert report["examples"] == 2
    assert {"score", "eval_loss", "perplexity", "samples"} <= report.keys()
    assert report["score"] == 0.5
    assert [(s["prediction"], s["reference"], s["score"]) for s in report["samples"]] == [
        (right_json(rows[0]), rows[0]["output"], 1.0), (wrong_json(rows[1]), rows[1]["output"], 0.0)]


def test_eval_base_recipe_text(workdir, trained_run):
    out = ok(invoke("eval", workdir["recipe"], "--base", "--limit", "1"))
    assert "(base): json_match" in out and "on 1 examples" in out


def test_chat_prompt(trained_run):
    result = invoke("chat", trained_run, "--prompt", "hi", "--max-new-tokens", "4")
    out = ok(result)
    assert out.endswith("\n")
    assert "Traceback" not in result.output


def test_export(trained_run, tmp_path):
    out_dir = tmp_path / "exported"
    out = ok(invoke("export", trained_run, "--out", out_dir))
    assert "merged model written to" in out
    assert (out_dir / "config.json").is_file() and (out_dir / "tokenizer.json").is_file()

    adapter_dir = tmp_path / "adapter"
    out = ok(invoke("export", trained_run, "--out", adapter_dir, "--no-merge"))
    assert "adapter written to" in out
    assert (adapter_dir / "adapter_config.json").is_file()

    fails(invoke("export", trained_run, "--out", out_dir), f"--out '{out_dir}' exists and is not empty")


# --- error paths ----------------------------------------------------------------------------------


def test_unknown_config_key(workdir):
    fails(invoke("train", workdir["recipe"], "--set", "train.lrr=0.01"),
          "--set train.lrr=0.01: unknown key 'train.lrr'; did you mean 'train.lr'?")
    fails(invoke("config", "show", workdir["recipe"], "--set", "trian.lr=0.01"), "unknown key 'trian'")


def test_unknown_model_name(workdir, tmp_path):
    fails(invoke("train", workdir["recipe"], "--set", "model=no-such-model", "--output-dir", tmp_path / "x"),
          "unknown model 'no-such-model'", "tunesmith models list")
    assert not (tmp_path / "x" / "adapter_config.json").exists()


def test_existing_output_dir(workdir, trained_run):
    fails(invoke("train", workdir["recipe"], "--max-steps", "1"),
          f"output_dir '{trained_run}' already exists and is not empty; pass --overwrite to replace it")


def test_resume_without_checkpoint(workdir, tmp_path):
    empty = tmp_path / "empty"
    fails(invoke("train", workdir["recipe"], "--resume", "--output-dir", empty),
          f"--resume: no checkpoint in '{empty}'", "train without --resume")


def test_eval_untrained_recipe_needs_base(workdir, tmp_path):
    recipe = yaml.safe_load(workdir["recipe"].read_text())
    recipe["output_dir"] = str(tmp_path / "never")
    recipe["data"] = {"train": str(workdir["dir"] / "train.jsonl"), "eval": str(workdir["dir"] / "eval.jsonl")}
    path = tmp_path / "untrained.yaml"
    path.write_text(yaml.safe_dump(recipe))
    fails(invoke("eval", path), "has not been trained yet", "--base")


# --- --set values that YAML would read differently from what the user typed ---------------------


def test_set_keeps_text_after_hash(workdir):
    shown = json.loads(ok(invoke("config", "show", workdir["recipe"], "--json",
                                 "--set", "data.system_prompt=Reply in JSON #strict",
                                 "--set", "data.chat_template=### {{ messages }}")))
    assert shown["data"]["system_prompt"] == "Reply in JSON #strict"
    assert shown["data"]["chat_template"] == "### {{ messages }}"


def test_set_value_with_colon(workdir):
    result = invoke("config", "show", workdir["recipe"], "--json", "--set", "data.system_prompt=Answer: JSON only")
    if result.exit_code == 0:  # accepted as the text the user typed
        assert json.loads(result.stdout)["data"]["system_prompt"] == "Answer: JSON only"
    else:  # or refused with a message that says which key
        fails(result, "data.system_prompt")
