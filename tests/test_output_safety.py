"""train, export and merge never lose a user's work (design.md section 7).

Every test hashes every file and lists every folder under the test's tree before and after: a refused
or failed command must leave it byte-identical, with no temporary, partial or empty folder added.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tunesmith import exporting as export_module
from tunesmith.cli import app
from tunesmith.config import load_config
from tunesmith.merging import run as merge_module
from tunesmith.training import run as train_module
from tunesmith.training.run import train

from helpers import tree, write_jsonl

TRAIN_FIX = "write to a folder that holds no inputs, such as runs/my-run"


def invoke(*args) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


def refused(result, message: str) -> None:
    """Exit 1 with exactly `message` on one line, and no traceback."""
    assert result.exit_code == 1, f"exit {result.exit_code}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert result.stderr.strip() == f"error: {message}"


@pytest.fixture(scope="module")
def rows():
    from tunesmith.demo.booking import generate

    return generate(n_train=8, n_eval=4, seed=1)[0]


def recipe_dict(data: Path, model: Path, output_dir: Path) -> dict:
    return {
        "model": str(model),
        "data": {"train": str(data), "max_length": 256},
        "method": {"name": "lora", "r": 4, "alpha": 8},
        "train": {"max_steps": 1, "batch_size": 4, "lr": 1e-3, "logging_steps": 1, "save_steps": 1, "bf16": False},
        "output_dir": str(output_dir),
    }


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory, tiny_model_dir, rows) -> Path:
    """A finished run (adapter, checkpoints, metrics), copied into each test that needs one."""
    root = tmp_path_factory.mktemp("earlier")
    data = write_jsonl(root / "train.jsonl", rows)
    return train(load_config(recipe_dict(data, tiny_model_dir, root / "run")), progress=False).output_dir


@pytest.fixture
def project(tmp_path, tiny_model_dir, rows, earlier_run) -> dict:
    """tmp_path/run: an earlier run; tmp_path/train.jsonl and tmp_path/recipe.yaml that write to it."""
    run = tmp_path / "run"
    shutil.copytree(earlier_run, run)
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(recipe_dict(data, tiny_model_dir, run)), encoding="utf-8")
    return {"run": run, "data": data, "recipe": recipe, "model": tiny_model_dir}


def write_recipe(path: Path, **changes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(changes), encoding="utf-8")
    return path


# --- train ---------------------------------------------------------------------------------------


def test_train_overwrite_with_broken_data_keeps_the_old_run(project, tmp_path):
    project["data"].write_text("not json\n", encoding="utf-8")
    before = tree(tmp_path)
    refused(invoke("train", project["recipe"], "--overwrite"),
            f"{project['data']}:1: not valid JSON (Expecting value at column 1); fix or remove this line")
    assert tree(tmp_path) == before


def test_train_refuses_a_project_folder_holding_the_recipe_and_the_data(tmp_path, tiny_model_dir, rows):
    folder = tmp_path / "my-project"
    folder.mkdir()
    data = write_jsonl(folder / "train.jsonl", rows)
    recipe = write_recipe(folder / "recipe.yaml", **recipe_dict(data, tiny_model_dir, tmp_path / "run"))
    before = tree(tmp_path)
    refused(invoke("train", recipe, "--output-dir", folder, "--overwrite"),
            f"output_dir '{folder}' contains the recipe '{recipe}', and an output folder is replaced as a whole; "
            + TRAIN_FIX)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("what", ["data file", "model", "continual.previous run"])
def test_train_refuses_an_output_dir_that_holds_an_input(what, project, tmp_path):
    folder = tmp_path / "my-project"
    config = yaml.safe_load(project["recipe"].read_text())
    if what == "data file":
        inside = folder / "train.jsonl"
        folder.mkdir()
        shutil.copy(project["data"], inside)
        config["data"]["train"] = str(inside)
    elif what == "model":
        inside = folder / "base"
        shutil.copytree(project["model"], inside)
        config["model"] = str(inside)
    else:
        inside = folder / "task1"
        shutil.copytree(project["run"], inside)
        config["continual"] = {"previous": [str(inside)]}
    recipe = write_recipe(tmp_path / "recipe.yaml", **config)
    before = tree(tmp_path, project["model"])
    refused(invoke("train", recipe, "--output-dir", folder, "--overwrite"),
            f"output_dir '{folder}' contains the {what} '{inside}', and an output folder is replaced as a whole; "
            + TRAIN_FIX)
    assert tree(tmp_path, project["model"]) == before


def test_train_refuses_to_write_inside_the_model_or_over_an_earlier_task(project, tmp_path):
    model = tmp_path / "base"
    shutil.copytree(project["model"], model)
    config = yaml.safe_load(project["recipe"].read_text())
    recipe = write_recipe(tmp_path / "recipe.yaml", **{**config, "model": str(model)})
    before = tree(tmp_path)
    refused(invoke("train", recipe, "--output-dir", model / "run"),
            f"output_dir '{model / 'run'}' is inside the model '{model}', and tunesmith never writes into its "
            "inputs; write to a folder outside it, such as runs/my-run")
    assert tree(tmp_path) == before

    previous = write_recipe(tmp_path / "next.yaml", **{**config, "continual": {"previous": [str(project["run"])]}})
    before = tree(tmp_path)
    refused(invoke("train", previous, "--overwrite"),
            f"output_dir '{project['run']}' is the continual.previous run '{project['run']}'; write to a new folder, "
            "such as runs/my-run")
    assert tree(tmp_path) == before


@pytest.mark.parametrize("where", [".", "..", "home"])
def test_train_refuses_the_working_directory_its_parents_and_home(where, project, tmp_path, monkeypatch):
    cwd = tmp_path / "work" / "here"
    cwd.mkdir(parents=True)
    (cwd / "notes.txt").write_text("mine")
    monkeypatch.chdir(cwd)
    out = where
    if where == "home":
        out = tmp_path / "home"
        out.mkdir()
        monkeypatch.setenv("HOME", str(out))
    before = tree(tmp_path)
    refused(invoke("train", project["recipe"], "--output-dir", out, "--overwrite"),
            f"output_dir '{out}' is the working directory, your home or one of their parents, which tunesmith never "
            "replaces or writes into; choose a dedicated folder, such as runs/my-run")
    assert tree(tmp_path) == before


def test_train_that_fails_before_a_checkpoint_restores_the_old_run(project, tmp_path, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(train_module, "load_model", out_of_memory)  # fails after the run folder is set up
    config = load_config(project["recipe"])
    before = tree(tmp_path)
    with pytest.raises(RuntimeError, match="out of memory"):
        train(config, overwrite=True, progress=False)
    assert tree(tmp_path) == before

    config.output_dir = str(tmp_path / "new" / "run")
    with pytest.raises(RuntimeError, match="out of memory"):
        train(config, progress=False)
    assert tree(tmp_path) == before  # not even the parent folder it created


def test_train_that_fails_after_a_checkpoint_keeps_the_new_run_to_resume(project, tmp_path, monkeypatch):
    real = train_module.write_json

    def summary_fails(path, obj):
        if path.name == "summary.json":
            raise OSError("disk full")
        real(path, obj)

    monkeypatch.setattr(train_module, "write_json", summary_fails)
    (project["run"] / "stale.txt").write_text("from the earlier run")
    with pytest.raises(OSError, match="disk full"):
        train(load_config(project["recipe"]), overwrite=True, progress=False)
    assert (project["run"] / "checkpoint-1" / "trainer_state.json").is_file()
    assert not (project["run"] / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml", "run", "train.jsonl"]


def test_train_overwrite_replaces_the_run(project, tmp_path):
    (project["run"] / "stale.txt").write_text("from the earlier run")
    result = train(load_config(project["recipe"]), overwrite=True, progress=False)
    assert result.output_dir == project["run"]
    assert not (project["run"] / "stale.txt").exists()
    assert (project["run"] / "adapter_model.safetensors").is_file() and (project["run"] / "summary.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml", "run", "train.jsonl"]


# --- export --------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["the run", "above the run", "inside the run", "the base model"])
def test_export_refuses_an_out_that_is_holds_or_lies_inside_an_input(case, project, tmp_path):
    run, model = project["run"], project["model"]
    out, message = {
        "the run": (run, f"is the run folder '{run}'; write to a new folder"),
        "above the run": (tmp_path, f"contains the run folder '{run}', and an output folder is replaced as a whole; "
                                    "write to a folder that holds no inputs"),
        "inside the run": (run / "export", f"is inside the run folder '{run}', and tunesmith never writes into its "
                                           "inputs; write to a folder outside it"),
        "the base model": (model, f"is the base model '{model}'; write to a new folder"),
    }[case]
    before = tree(tmp_path, model)
    refused(invoke("export", run, "--out", out, "--overwrite"), f"--out '{out}' {message}, such as exports/my-model")
    assert tree(tmp_path, model) == before


class HalfWrittenModel:
    """Writes one shard, then the disk fills up."""

    def save_pretrained(self, folder, **kwargs):
        (Path(folder) / "model-00001-of-00002.safetensors").write_bytes(b"partial")
        raise OSError("disk full")


def test_export_that_fails_midway_keeps_the_old_folder(project, tmp_path, monkeypatch):
    monkeypatch.setattr(export_module, "_merged_model", lambda run_dir, config: (HalfWrittenModel(), None))
    old = tmp_path / "exported"
    old.mkdir()
    (old / "model.safetensors").write_bytes(b"the earlier export")
    before = tree(tmp_path)
    with pytest.raises(OSError, match="disk full"):
        export_module.export(str(project["run"]), str(old), overwrite=True)
    assert tree(tmp_path) == before
    with pytest.raises(OSError, match="disk full"):
        export_module.export(str(project["run"]), str(tmp_path / "new" / "exported"))
    assert tree(tmp_path) == before


def test_export_overwrite_replaces_the_folder(project, tmp_path):
    old = tmp_path / "exported"
    old.mkdir()
    (old / "stale.txt").write_text("the earlier export")
    result = invoke("export", project["run"], "--out", old, "--no-merge", "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (old / "stale.txt").exists() and (old / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported", "recipe.yaml", "run", "train.jsonl"]


# --- merge ---------------------------------------------------------------------------------------


@pytest.fixture
def zoo(tmp_path, tiny_model_dir) -> dict:
    """tmp_path/models/a and b (two copies of the tiny model) and a linear merge spec of them."""
    models = tmp_path / "models"
    for name in ("a", "b"):
        shutil.copytree(tiny_model_dir, models / name)
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"method": "linear", "models": [str(models / "a"), str(models / "b")]}))
    return {"models": models, "a": models / "a", "spec": spec}


def test_merge_refuses_an_out_that_holds_its_inputs(zoo, tmp_path):
    before = tree(tmp_path)
    refused(invoke("merge", zoo["spec"], "--out", zoo["models"], "--overwrite"),
            f"--out '{zoo['models']}' contains the input models[0] '{zoo['a']}', and an output folder is replaced as a "
            "whole; write to a folder that holds no inputs, such as merged/my-model")
    assert tree(tmp_path) == before
    refused(invoke("merge", zoo["spec"], "--out", zoo["a"] / "merged"),
            f"--out '{zoo['a'] / 'merged'}' is inside the input models[0] '{zoo['a']}', and tunesmith never writes into "
            "its inputs; write to a folder outside it, such as merged/my-model")
    assert tree(tmp_path) == before


def test_merge_refuses_an_out_that_holds_the_spec(zoo, tmp_path):
    folder = tmp_path / "project"
    folder.mkdir()
    spec = folder / "spec.yaml"
    shutil.copy(zoo["spec"], spec)
    before = tree(tmp_path)
    refused(invoke("merge", spec, "--out", folder, "--overwrite"),
            f"--out '{folder}' contains the merge spec '{spec}', and an output folder is replaced as a whole; "
            "write to a folder that holds no inputs, such as merged/my-model")
    assert tree(tmp_path) == before


def test_merge_that_fails_midway_keeps_the_old_folder(zoo, tmp_path, monkeypatch):
    def disk_full(plan, name):
        raise OSError("disk full")

    monkeypatch.setattr(merge_module, "merge_tensor", disk_full)
    old = tmp_path / "merged"
    old.mkdir()
    (old / "model.safetensors").write_bytes(b"the earlier merge")
    before = tree(tmp_path)
    with pytest.raises(OSError, match="disk full"):
        merge_module.merge(zoo["spec"], old, overwrite=True, progress=False)
    assert tree(tmp_path) == before


def test_merge_overwrite_replaces_the_folder(zoo, tmp_path):
    old = tmp_path / "merged"
    old.mkdir()
    (old / "stale.txt").write_text("the earlier merge")
    merge_module.merge(zoo["spec"], old, overwrite=True, progress=False)
    assert not (old / "stale.txt").exists() and (old / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "models", "spec.yaml"]

