"""`tunesmith sweep`: grid parsing, the Pareto front, the results table, resuming a killed sweep, parallel
scheduling, and every bad input (one line, exit 1, nothing created, no input touched)."""
from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from helpers import fails, invoke, ok, tree
from tunesmith.errors import TunesmithError
from tunesmith.sweep import plan_sweep, run_sweep
from tunesmith.sweep.grid import expand, parse_grid, run_name
from tunesmith.sweep.metrics import METRICS, best_row, parse_requirement
from tunesmith.sweep.parallel import device_slots
from tunesmith.sweep.pareto import pareto_front, pareto_page
from tunesmith.sweep.results import read_rows


@pytest.fixture
def recipe_file(tmp_path, tiny_recipe) -> Path:
    """The tiny recipe as a file in its own project folder, trained 2 steps, eval on 2 examples."""
    config = dict(tiny_recipe, train={**tiny_recipe["train"], "max_steps": 2},
                  eval={**tiny_recipe["eval"], "limit": 2, "general_tokens": 64})
    config["output_dir"] = str(tmp_path / "runs" / "booking")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def fake_run(job) -> dict:
    """A stand-in for training: the run folder gets a summary (and eval.json) whose numbers follow the values."""
    job.run_dir.mkdir(parents=True, exist_ok=True)
    lr = float(job.values.get("train.lr", 1))
    seed = job.values.get("train.seed", 0)
    (job.run_dir / "summary.json").write_text(json.dumps({"train_loss": lr + seed, "eval_loss": lr * 2}))
    (job.run_dir / "eval.json").write_text(json.dumps({"score": seed / 10}))
    return {"run": job.run, "values": job.values, "metrics": {"train_loss": lr + seed, "eval_loss": lr * 2,
                                                               "score": seed / 10}}


# ---- the grid ----------------------------------------------------------------------------------------------
def test_grid_values_are_typed_like_set_and_expand_in_order():
    grid = parse_grid(["train.lr=1e-4,0.001", "method.r=8,16", "method.target_modules=[q_proj,v_proj],[k_proj]"])
    assert grid == {"train.lr": ["1e-4", 0.001], "method.r": [8, 16],
                    "method.target_modules": [["q_proj", "v_proj"], ["k_proj"]]}
    assert expand({"a": [1, 2], "b": ["x", "y"]}) == [{"a": 1, "b": "x"}, {"a": 1, "b": "y"},
                                                      {"a": 2, "b": "x"}, {"a": 2, "b": "y"}]


def test_run_names_say_the_values_and_never_collide():
    assert run_name({"train.lr": "1e-4", "method.r": 8}) == "train.lr=1e-4_method.r=8"
    odd = [run_name({"data.system_prompt": v}) for v in ("a b", "a/b", "a:b")]
    assert len(set(odd)) == 3 and all(re.fullmatch(r"[A-Za-z0-9._=+-]+", n) for n in odd)
    assert run_name({"method.target_modules": ["q_proj", "v_proj"]}).startswith("method.target_modules=q_proj+v_proj-")


# ---- best run and Pareto front -----------------------------------------------------------------------------
def test_best_run_follows_the_metric_direction_and_keeps_the_first_of_equals():
    rows = [{"run": "a", "metrics": {"score": 0.5, "eval_loss": 2.0}},
            {"run": "b", "metrics": {"score": 0.75, "eval_loss": 3.0}},
            {"run": "c", "metrics": {"score": 0.75, "eval_loss": 1.5}},
            {"run": "d", "metrics": {"eval_loss": float("nan")}}]
    assert best_row(rows, METRICS["score"])["run"] == "b"
    assert best_row(rows, METRICS["eval_loss"])["run"] == "c"
    assert best_row(rows, METRICS["general_change"]) is None


def test_required_runs_only_compete_for_best():
    """The smallest general change among the runs that keep score >= 0.9: not the smallest overall."""
    rows = [{"run": "a", "metrics": {"score": 0.98, "general_change": 0.10}},
            {"run": "b", "metrics": {"score": 0.98, "general_change": 0.005}},
            {"run": "c", "metrics": {"score": 0.74, "general_change": 0.001}},
            {"run": "d", "metrics": {"general_change": 0.0}}]
    keep = (parse_requirement("score>=0.9"),)
    assert best_row(rows, METRICS["general_change"])["run"] == "d"
    assert best_row(rows, METRICS["general_change"], keep)["run"] == "b"
    assert best_row(rows, METRICS["general_change"], (parse_requirement("score >= 0.99"),)) is None
    assert best_row(rows, METRICS["score"], (parse_requirement("general_change<=1e-2"),))["run"] == "b"
    assert str(parse_requirement(" score>=.93 ")) == "score >= 0.93"


def test_pareto_front_matches_a_hand_computed_case():
    # (task score, general change): (0.5, 0.08) is beaten by (0.7, 0.05); (0.8, 0.12) by (0.8, 0.10); the two
    # equal (0.6, 0.02) points beat neither each other nor anything else on both.
    points = [(0.8, 0.10), (0.6, 0.02), (0.7, 0.05), (0.5, 0.08), (0.8, 0.12), (0.6, 0.02)]
    assert pareto_front(points) == [0, 1, 2, 5]


def test_pareto_page_is_self_contained_and_highlights_the_front():
    rows = [{"run": f"runs/r{i}", "values": {}, "metrics": {"score": s, "general_change": c}}
            for i, (s, c) in enumerate([(0.8, 0.10), (0.5, 0.08), (0.7, 0.05)])]
    rows.append({"run": "runs/no-forgetting", "values": {}, "metrics": {"score": 0.9}})
    page = pareto_page("sweep", rows)
    assert page.count('<circle class="front"') == 2 and page.count('<circle class="point"') == 1
    assert page.count('<tr class="front">') == 2 and "no-forgetting" not in page
    assert "<script" not in page and not re.search(r'(src|href)="', page)
    assert re.findall(r"https?://[^\"]+", page) == ["http://www.w3.org/2000/svg"]  # the SVG namespace, not a fetch


# ---- running, recording, resuming (a stand-in for training) ------------------------------------------------
class Killed(Exception):
    pass


def test_a_killed_sweep_reruns_only_unfinished_runs(recipe_file, tmp_path):
    out = tmp_path / "sweep"
    plan = plan_sweep(recipe_file, ["train.lr=1e-3,1e-2", "train.seed=1,2"], out=out)
    assert not out.exists()  # planning touches nothing

    def kill_after_two(row, finished, total):
        if finished == 2:
            raise Killed

    with pytest.raises(Killed):
        run_sweep(plan, run=fake_run, on_run=kill_after_two)
    assert [r["values"] for r in read_rows(out)] == [{"train.lr": "1e-3", "train.seed": 1},
                                                    {"train.lr": "1e-3", "train.seed": 2}]
    # the third run was killed mid-training: a folder without its summary; the fourth finished training but
    # was killed before its line was written. Both are trained again, not reused.
    (out / "runs" / "train.lr=1e-2_train.seed=1").mkdir()
    (out / "runs" / "train.lr=1e-2_train.seed=1" / "config.yaml").write_text("half")
    fake_run(plan.jobs[3])
    trained = []
    result = run_sweep(plan_sweep(recipe_file, ["train.lr=1e-3,1e-2", "train.seed=1,2"], out=out),
                       run=lambda job: trained.append(job.run) or fake_run(job))
    assert trained == ["runs/train.lr=1e-2_train.seed=1", "runs/train.lr=1e-2_train.seed=2"]
    assert result.trained == 2 and len(result.rows) == 4 and len(read_rows(out)) == 4
    assert result.best["run"] == "runs/train.lr=1e-3_train.seed=2"  # score = seed / 10, the recipe has eval data
    again = run_sweep(plan_sweep(recipe_file, ["train.lr=1e-3,1e-2", "train.seed=1,2"], out=out), run=fake_run)
    assert again.trained == 0


def test_a_run_whose_summary_is_gone_is_trained_again(recipe_file, tmp_path):
    out = tmp_path / "sweep"
    run_sweep(plan_sweep(recipe_file, ["train.seed=1,2"], out=out), run=fake_run)
    (out / "runs" / "train.seed=1" / "summary.json").unlink()
    trained = []
    run_sweep(plan_sweep(recipe_file, ["train.seed=1,2"], out=out), run=lambda j: trained.append(j.run) or fake_run(j))
    assert trained == ["runs/train.seed=1"]
    assert len(read_rows(out)) == 2  # its line was replaced, not added twice


def test_parallel_runs_at_most_n_at_once_and_records_every_run(recipe_file, tmp_path):
    running, most, lock = [0], [0], threading.Lock()

    def slow_run(job):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        return fake_run(job)

    plan = plan_sweep(recipe_file, ["train.seed=1,2,3,4,5"], out=tmp_path / "sweep", parallel=2)
    result = run_sweep(plan, run=slow_run, pool=ThreadPoolExecutor)
    assert most[0] == 2 and result.trained == 5 and len(read_rows(tmp_path / "sweep")) == 5


def test_parallel_failure_keeps_the_runs_that_finished_and_the_rerun_trains_the_rest(recipe_file, tmp_path):
    out = tmp_path / "sweep"

    def third_fails(job):
        if job.values["train.seed"] == 3:
            raise TunesmithError("out of memory")
        return fake_run(job)

    plan = plan_sweep(recipe_file, ["train.seed=1,2,3,4,5,6"], out=out, parallel=2)
    with pytest.raises(TunesmithError, match="out of memory"):
        run_sweep(plan, run=third_fails, pool=ThreadPoolExecutor)
    recorded = {r["values"]["train.seed"] for r in read_rows(out)}
    finished = {int(p.name.split("=")[1]) for p in (out / "runs").iterdir() if (p / "summary.json").exists()}
    assert recorded == finished and {1, 2} <= recorded and 3 not in recorded
    trained = []
    run_sweep(plan_sweep(recipe_file, ["train.seed=1,2,3,4,5,6"], out=out, parallel=2),
              run=lambda j: trained.append(j.values["train.seed"]) or fake_run(j), pool=ThreadPoolExecutor)
    assert sorted(trained) == sorted({1, 2, 3, 4, 5, 6} - recorded)


def test_parallel_workers_share_the_gpus_round_robin():
    assert device_slots(3, 2) == ["0", "1", "0"]
    assert device_slots(2, 0) == [None, None]


def test_the_table_holds_each_runs_numbers_and_names_the_best(recipe_file, tmp_path):
    out = tmp_path / "sweep"
    run_sweep(plan_sweep(recipe_file, ["train.lr=1e-3,1e-2"], out=out, metric="eval_loss"), run=fake_run)
    table = (out / "sweep.md").read_text()
    assert "Best by eval_loss" in table and "lower is better" in table
    assert "**runs/train.lr=1e-3**" in table  # eval_loss = 2 * lr
    assert table_rows(table)["runs/train.lr=1e-2"]["eval_loss"] == "0.02"


def test_the_table_names_the_best_run_that_keeps_the_requirement_or_how_close_any_came(recipe_file, tmp_path):
    out = tmp_path / "sweep"
    grid = ["train.lr=1e-3,1e-2", "train.seed=1,2"]  # fake_run: eval_loss = 2 lr, score = seed / 10
    run_sweep(plan_sweep(recipe_file, grid, out=out, metric="eval_loss", require=["score>=0.2"]), run=fake_run)
    table = (out / "sweep.md").read_text()
    assert "among the runs with score >= 0.2" in table and "**runs/train.lr=1e-3_train.seed=2**" in table
    r = invoke("sweep", recipe_file, *sum((["--grid", g] for g in grid), []), "--out", out, "--metric", "eval_loss",
               "--require", "score>=0.5")  # every run is finished: only the views are written again
    ok(r)
    assert "none: no finished run meets them (score reached 0.2 at best)" in r.output
    assert "score reached 0.2 at best" in (out / "sweep.md").read_text()


def table_rows(markdown: str) -> dict[str, dict[str, str]]:
    """sweep.md's table as {run: {column: cell}}, the best-run mark removed."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].replace(" (best)", "")] = dict(zip(header, cells))
    return rows


# ---- bad inputs --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, fragments", [
    (["--grid", "train.lrr=1e-4,1e-3"], ["--grid train.lrr", "unknown config key", "'train.lr'"]),
    (["--grid", "train.lr="], ["--grid train.lr", "empty value"]),
    (["--grid", "train.lr=1e-4,,1e-3"], ["--grid train.lr", "empty value"]),
    (["--grid", "train.lr=1e-4", "--grid", "train.lr=1e-3"], ["--grid train.lr is given twice"]),
    (["--grid", "train.lr=1e-4,1e-4"], ["1e-4 is listed twice"]),
    (["--grid", "train.lr"], ["expected KEY=V1,V2"]),
    ([], ["at least one --grid"]),
    (["--grid", "output_dir=a,b"], ["--grid output_dir", "--out"]),
    (["--grid", "train.lr=abc,1e-3"], ["--grid train.lr (value abc)", "train.lr"]),
    (["--grid", "train.seed=1,2", "--metric", "scor"], ["--metric scor", "'score'"]),
    (["--grid", "train.seed=1,2", "--metric", "general_change"], ["add --forgetting"]),
    (["--grid", "train.seed=1,2", "--require", "score>0.9"], ["--require 'score>0.9'", "METRIC>=VALUE"]),
    (["--grid", "train.seed=1,2", "--require", "scor>=0.9"], ["--require 'scor>=0.9'", "'score'"]),
    (["--grid", "train.seed=1,2", "--require", "general_change<=0.01"], ["--require", "add --forgetting"]),
    (["--grid", "train.seed=1,2", "--parallel", "0"], ["--parallel 0"]),
    (["--grid", "train.seed=1,2", "--search", "random"], ["--search random"]),
    (["--grid", "train.seed=1,2", "--search", "optuna"], ["needs --trials"]),
    (["--grid", "train.seed=1,2", "--search", "optuna", "--trials", "0"], ["--trials 0"]),
    (["--grid", "train.seed=1,2", "--trials", "3"], ["--trials applies to --search optuna"]),
])
def test_bad_sweep_options_are_one_line_and_create_nothing(recipe_file, tmp_path, args, fragments):
    before = tree(tmp_path)
    fails(invoke("sweep", recipe_file, *args, "--out", tmp_path / "sweep"), *fragments)
    assert tree(tmp_path) == before


def test_an_out_that_is_or_holds_an_input_is_refused(recipe_file, tmp_path, tiny_model_dir):
    before = tree(tmp_path, tiny_model_dir)
    grid = ["--grid", "train.seed=1,2"]
    fails(invoke("sweep", recipe_file, *grid, "--out", tmp_path), "--out", "recipe")
    fails(invoke("sweep", recipe_file, *grid, "--out", tiny_model_dir), "is the model")
    fails(invoke("sweep", recipe_file, *grid, "--out", tiny_model_dir / "sweep"), "inside the model")
    fails(invoke("sweep", recipe_file, *grid, "--out", recipe_file), "is a file")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    before = tree(tmp_path, tiny_model_dir)
    fails(invoke("sweep", recipe_file, *grid, "--out", tmp_path / "notes"), "holds no sweep.json")
    assert tree(tmp_path, tiny_model_dir) == before


def test_a_sweep_folder_of_another_config_is_refused(recipe_file, tmp_path):
    out = tmp_path / "sweep"
    run_sweep(plan_sweep(recipe_file, ["train.seed=1,2"], out=out), run=fake_run)
    before = tree(tmp_path)
    fails(invoke("sweep", recipe_file, "--grid", "train.seed=1,2", "--set", "train.max_steps=3", "--out", out),
          "another config", "train.max_steps")
    assert tree(tmp_path) == before


def test_a_first_run_that_fails_leaves_no_sweep_folder(recipe_file, tmp_path):
    def broken(job):
        raise TunesmithError("data file missing")

    with pytest.raises(TunesmithError):
        run_sweep(plan_sweep(recipe_file, ["train.seed=1,2"], out=tmp_path / "new" / "sweep"), run=broken)
    assert not (tmp_path / "new").exists()


def test_optuna_counts_a_run_that_misses_a_requirement_as_a_failed_trial(recipe_file, tmp_path):
    from tunesmith.sweep.search import _value

    plan = plan_sweep(recipe_file, ["train.seed=1,2"], out=tmp_path / "sweep", require=["score>=0.15"])
    assert _value({"metrics": {"score": 0.1}}, plan) is None
    assert _value({"metrics": {"score": 0.2}}, plan) == 0.2


def test_a_sweep_stopped_by_ctrl_c_says_how_to_continue(recipe_file, tmp_path, monkeypatch):
    import signal

    from tunesmith.sweep import runner
    from tunesmith.training.interrupt import TrainingInterrupted

    def second_interrupted(job):
        if job.values["train.seed"] == 2:
            raise TrainingInterrupted(signal.SIGINT, 1, None)
        return fake_run(job)

    monkeypatch.setattr(runner, "train_and_score", second_interrupted)
    result = invoke("sweep", recipe_file, "--grid", "train.seed=1,2", "--out", tmp_path / "sweep")
    assert result.exit_code == 130 and "Traceback" not in result.output
    assert "stopped by SIGINT" in result.stderr and "rerun the same command" in result.stderr
    assert [r["values"] for r in read_rows(tmp_path / "sweep")] == [{"train.seed": 1}]


def test_optuna_missing_names_the_pip_command(recipe_file, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "optuna" else real(name, *a))
    before = tree(tmp_path)
    fails(invoke("sweep", recipe_file, "--grid", "train.seed=1,2", "--search", "optuna", "--trials", "2",
                 "--out", tmp_path / "sweep"), "pip install 'tunesmith[sweep]'")
    assert tree(tmp_path) == before


def test_optuna_search_trains_the_trials_and_continues(recipe_file, tmp_path):
    pytest.importorskip("optuna")
    from tunesmith.sweep.search import search_sweep

    out = tmp_path / "sweep"
    grid = ["train.lr=1e-3,1e-2,1e-1", "train.seed=1,2,3"]
    first = search_sweep(plan_sweep(recipe_file, grid, out=out), 3, run=fake_run)
    assert first.trained == 3 and len(read_rows(out)) == 3
    seen = [c["values"] for c in read_rows(out)]
    more = search_sweep(plan_sweep(recipe_file, grid, out=out), 5, run=fake_run)
    assert more.trained == 2 and [r["values"] for r in read_rows(out)][:3] == seen
    assert len({json.dumps(r["values"], sort_keys=True) for r in read_rows(out)}) == 5


# ---- the real thing on the tiny model ----------------------------------------------------------------------
@pytest.mark.slow
def test_a_2x2_sweep_on_the_tiny_model_killed_and_rerun(recipe_file, tmp_path, tiny_model_dir):
    out = tmp_path / "sweep"
    inputs_before = tree(tiny_model_dir) | {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
                                            for p in tmp_path.glob("*.*")}
    grid = ["train.lr=1e-3,1e-2", "method.r=2,4"]

    def kill_after_two(row, finished, total):
        if finished == 2:
            raise Killed

    with pytest.raises(Killed):
        run_sweep(plan_sweep(recipe_file, grid, out=out, progress=False), on_run=kill_after_two)
    first = {p.name: (p / "adapter_model.safetensors").stat().st_mtime_ns for p in (out / "runs").iterdir()}
    assert len(first) == 2
    stdout = ok(invoke("sweep", recipe_file, "--grid", grid[0], "--grid", grid[1], "--out", out, "--json"))
    result = json.loads(stdout)
    assert result["trained"] == 2 and result["metric"] == "score" and result["higher_is_better"] is True
    assert {p.name: (p / "adapter_model.safetensors").stat().st_mtime_ns
            for p in (out / "runs").iterdir() if p.name in first} == first  # the finished runs were not retrained
    table = table_rows((out / "sweep.md").read_text())
    assert len(table) == 4
    for row in read_rows(out):
        run = out / row["run"]
        summary = json.loads((run / "summary.json").read_text())
        scored = json.loads((run / "eval.json").read_text())
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert str(config["train"]["lr"]) == str(float(row["values"]["train.lr"]))
        assert config["method"]["r"] == row["values"]["method.r"]
        assert summary["steps"] == 2
        assert row["metrics"]["train_loss"] == summary["train_loss"]
        assert row["metrics"]["eval_loss"] == summary["eval_loss"]
        assert row["metrics"]["score"] == scored["score"]
        cells = table[row["run"]]
        assert float(cells["train_loss"]) == summary["train_loss"] and float(cells["eval_loss"]) == summary["eval_loss"]
        assert float(cells["score"]) == scored["score"]
    best = max(read_rows(out), key=lambda r: r["metrics"]["score"])  # the first of equals, as the table says
    assert result["best"]["run"] == best["run"]
    assert tree(tiny_model_dir) | {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
                                   for p in tmp_path.glob("*.*")} == inputs_before


@pytest.mark.slow
def test_a_forgetting_sweep_plots_score_against_general_change(recipe_file, tmp_path):
    out = tmp_path / "sweep"
    ok(invoke("sweep", recipe_file, "--grid", "train.lr=1e-3,1e-1", "--forgetting", "--out", out))
    rows = read_rows(out)
    assert len(rows) == 2
    for row in rows:
        report = json.loads((out / row["run"] / "forgetting.json").read_text())
        assert row["metrics"]["general_change"] == report["general"]["relative_change"]
        assert row["metrics"]["score"] == report["task"]["score"]
    page = (out / "pareto.html").read_text()
    assert "<svg" in page and page.count("<circle") == 2 and "<script" not in page


@pytest.mark.slow
def test_parallel_sweep_trains_in_two_worker_processes(recipe_file, tmp_path):
    out = tmp_path / "sweep"
    result = run_sweep(plan_sweep(recipe_file, ["train.lr=1e-3,1e-2"], out=out, parallel=2, progress=False))
    assert result.trained == 2
    for row in read_rows(out):
        summary = json.loads((out / row["run"] / "summary.json").read_text())
        assert row["metrics"]["eval_loss"] == summary["eval_loss"] and summary["steps"] == 2
