"""`tunesmith merge SPEC --search --eval TASK.yaml`: the grid, the choice, the written tables, the diagnosis.

The choice is checked with a cheap deterministic scorer on hand-made adapters whose task vectors are known
entries of one tensor: adapter `alpha` adds 1 at q_proj[0, 0] of layer 0, adapter `beta` adds 1 at [1, 1]. A
task's score is read from how far the merged model moved that entry (p): task alpha scores 1 - |p - 1|, task
beta half of that, so its best model alone scores 0.5 and the search must compare shares, not raw scores.
Every expected number below is worked out by hand from those definitions. The diagnosis statistics are
checked on tensors small enough to compute cosines and sign conflicts on paper.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from helpers import fails, invoke, ok, write_jsonl
from tunesmith.errors import TunesmithError
from tunesmith.merging import diagnose
from tunesmith.merging.run import plan_merge
from tunesmith.merging.search import Candidate, InMemoryMerge, expand_grid, parse_grid, search
from tunesmith.merging.spec import load_merge_spec

Q = "model.layers.0.self_attn.q_proj.weight"
ENTRY = {"alpha": (0, 0), "beta": (1, 1)}
TOP = {"alpha": 1.0, "beta": 0.5}  # the best a task can score


# ---- inputs -------------------------------------------------------------------------------------------------
def unit_adapter(folder: Path, base: Path, row: int, col: int) -> Path:
    """A rank-1 PEFT LoRA adapter whose task vector (scale 1 * B @ A) is 1 at q_proj[row, col], 0 elsewhere."""
    folder.mkdir()
    size = load_file(base / "model.safetensors")[Q].shape[0]
    a, b = torch.zeros(1, size), torch.zeros(size, 1)
    a[0, col], b[row, 0] = 1.0, 1.0
    prefix = "base_model.model." + Q.removesuffix(".weight")
    save_file({f"{prefix}.lora_A.weight": a, f"{prefix}.lora_B.weight": b}, folder / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": 1, "lora_alpha": 1, "target_modules": ["q_proj"],
              "base_model_name_or_path": str(base)}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def task_file(folder: Path, name: str, base: Path, rows: list[dict], **eval_section) -> Path:
    data = write_jsonl(folder / f"{name}-eval.jsonl", rows)
    recipe = {"model": str(base), "data": {"train": str(data), "eval": str(data), "max_length": 256},
              "eval": {"scorer": "exact_match", "max_new_tokens": 4, "batch_size": 4, **eval_section},
              "output_dir": str(folder / f"{name}-run")}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("search")
    rows = [{"instruction": f"Say {w}.", "output": w} for w in ("one", "two", "three", "four", "five", "six")]
    spec = {"method": "linear", "base_model": str(tiny_model_dir),
            "models": [str(unit_adapter(root / "alpha-adapter", tiny_model_dir, *ENTRY["alpha"])),
                       str(unit_adapter(root / "beta-adapter", tiny_model_dir, *ENTRY["beta"]))]}
    spec_path = root / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    return {"root": root, "spec": spec_path, "base": tiny_model_dir,
            "tasks": [task_file(root, "alpha", tiny_model_dir, rows), task_file(root, "beta", tiny_model_dir, rows)]}


@pytest.fixture(scope="module")
def moved(inputs):
    """score_fn: each task's score from how far the model moved its entry of q_proj."""
    base = load_file(inputs["base"] / "model.safetensors")[Q]

    def score(model, tokenizer, task, rows) -> float:
        p = float(model.state_dict()[Q][ENTRY[task.name]] - base[ENTRY[task.name]])
        return TOP[task.name] * max(0.0, 1.0 - abs(p - 1.0))

    return score


def run_search(inputs, moved, out: Path, candidates, **kw):
    return search(inputs["spec"], inputs["tasks"], out, candidates=candidates, val_rows=2, progress=False,
                  score_fn=moved, **kw)


X = Candidate("linear", (1.0, 1.0))  # p = (1/2, 1/2): shares (0.5, 0.5); raw scores (0.5, 0.25)
Z = Candidate("task_arithmetic", (0.35, 0.7), lambda_=1.0)  # p = (0.35, 0.7): shares (0.35, 0.7); raw (0.35, 0.35)
W = Candidate("task_arithmetic", (0.5, 0.9), lambda_=1.0)  # p = (0.5, 0.9): shares (0.5, 0.9), mean 0.7


# ---- the choice ---------------------------------------------------------------------------------------------
def test_the_worst_share_of_each_tasks_best_alone_decides(inputs, moved, tmp_path):
    # By raw scores Z's worst task (0.35) beats X's (0.25); as shares of each task's best single model
    # (alpha 1.0 by the alpha adapter, beta 0.5 by the beta adapter) X keeps 0.5 of both, Z only 0.35 of alpha.
    result = run_search(inputs, moved, tmp_path / "out", [Z, X])
    assert result.winner == X
    assert result.references == {"alpha": {"score": pytest.approx(1.0), "model": str(inputs["root"] / "alpha-adapter")},
                                 "beta": {"score": pytest.approx(0.5), "model": str(inputs["root"] / "beta-adapter")}}
    rows = [json.loads(line) for line in (tmp_path / "out" / "search.jsonl").read_text().splitlines()]
    assert [r["candidate"] for r in rows] == ["task_arithmetic w=0.35:0.7 lambda=1", "linear w=1:1"]
    assert rows[0]["scores"] == pytest.approx({"alpha": 0.35, "beta": 0.35}, abs=1e-6)
    assert rows[0]["relative"] == pytest.approx({"alpha": 0.35, "beta": 0.7}, abs=1e-6)
    assert rows[1]["worst"] == pytest.approx(0.5, abs=1e-6) and rows[1]["mean"] == pytest.approx(0.5, abs=1e-6)


def test_a_tie_on_the_worst_share_goes_to_the_larger_mean(inputs, moved, tmp_path):
    result = run_search(inputs, moved, tmp_path / "out", [X, W])  # both keep 0.5 of alpha; W keeps 0.9 of beta
    assert result.winner == W


def test_the_winner_is_written_as_merge_writes_it_with_every_table(inputs, moved, tmp_path):
    out = tmp_path / "out"
    result = run_search(inputs, moved, out, [X, W], goal=0.5)
    assert result.reached and result.diagnosis == [] and not (out / "diagnosis.json").exists()
    written = load_file(out / "model.safetensors")[Q] - load_file(inputs["base"] / "model.safetensors")[Q]
    assert written[0, 0].item() == pytest.approx(0.5, abs=1e-6) and written[1, 1].item() == pytest.approx(0.9, abs=1e-6)
    assert yaml.safe_load((out / "merge_spec.yaml").read_text())["method"] == "task_arithmetic"
    held = json.loads((out / "task_scores.json").read_text())
    assert held["alpha"]["score"] == pytest.approx(0.5, abs=1e-6) and held["alpha"]["alone"] == pytest.approx(1.0)
    assert held["beta"]["score"] == pytest.approx(0.45, abs=1e-6) and held["beta"]["alone"] == pytest.approx(0.5)
    assert held["alpha"]["examples"] == 4  # 6 eval rows, 2 for validation
    table = (out / "search.md").read_text()
    assert "task_arithmetic w=0.5:0.9 lambda=1 (chosen)" in table and "keeps at least 50%" in table


def test_below_the_goal_it_says_by_how_much_and_writes_the_diagnosis(inputs, moved, tmp_path):
    result = run_search(inputs, moved, tmp_path / "out", [X])
    assert not result.reached
    assert "keeps 50% of alpha's score, missing the goal by 40 points" in (tmp_path / "out" / "search.md").read_text()
    diagnosis = json.loads((tmp_path / "out" / "diagnosis.json").read_text())
    # One changed tensor, in layer 0: two one-hot task vectors at different entries (cosine 0, norms 1, never both set).
    assert diagnosis["layers"] == [{"layer": "0", "cosine": 0.0, "norms": [1.0, 1.0], "overlap": 0.0, "conflict": 0.0}]


def test_in_memory_merge_puts_back_what_an_earlier_merge_changed(inputs):

    base = load_file(inputs["base"] / "model.safetensors")
    spec = yaml.safe_load(inputs["spec"].read_text())
    memory = InMemoryMerge(inputs["base"], [])
    summed = {**spec, "models": [{"model": m, "weight": 1.0} for m in spec["models"]], "normalize": False}
    memory.apply(plan_merge(load_merge_spec(summed)))
    embed = "model.embed_tokens.weight"  # no adapter touches it; an unnormalized sum of two models doubles it
    assert torch.allclose(memory.weights[embed], 2 * base[embed])
    first_alone = {**spec, "models": [{"model": m, "weight": w} for m, w in zip(spec["models"], (1.0, 0.0))]}
    memory.apply(plan_merge(load_merge_spec(first_alone)))
    assert torch.equal(memory.weights[embed], base[embed])
    moved = memory.weights[Q] - base[Q]
    assert moved[0, 0].item() == pytest.approx(1.0, abs=1e-6) and moved[1, 1].item() == pytest.approx(0.0, abs=1e-6)


# ---- the grid -----------------------------------------------------------------------------------------------
def test_default_grid_sizes():
    # two models: linear 3 weightings, slerp 3 t, task_arithmetic 3 x 2 lambdas, ties 3 x 2 densities, dare_ties 3
    assert len(expand_grid(2)) == 3 + 3 + 6 + 6 + 3
    # three models: no slerp, 4 weightings (equal, each model emphasised)
    assert len(expand_grid(3)) == 4 + 8 + 8 + 4
    assert Candidate("ties", (1.0, 0.5, 0.5), None, 0.3) in expand_grid(3)


def test_grid_overrides_replace_the_defaults():
    grid = parse_grid(["method=ties,slerp", "density=0.2", "weights=1:0.25"], 2)
    assert expand_grid(2, grid) == [Candidate("ties", (1.0, 0.25), None, 0.2), Candidate("slerp", None, None, None, 0.3),
                                    Candidate("slerp", None, None, None, 0.5), Candidate("slerp", None, None, None, 0.7)]


@pytest.mark.parametrize("items, n, message", [
    (["speed=1"], 2, "KEY one of method, weights"),
    (["method=mean"], 2, "unknown method 'mean'"),
    (["density=x"], 2, "'x' is not a number"),
    (["weights=1:1:1"], 2, "has 3 weights but the spec merges 2 models"),
    (["lambda="], 2, "no values after '='"),
])
def test_bad_grid_items(items, n, message):
    with pytest.raises(TunesmithError, match=message):
        parse_grid(items, n)


def test_slerp_of_three_models_leaves_nothing_to_try():
    with pytest.raises(TunesmithError, match="exactly two models"):
        expand_grid(3, {"method": ["slerp"]})


# ---- the diagnosis, by hand ---------------------------------------------------------------------------------
def test_cosine_by_hand():
    assert diagnose.cosine(torch.tensor([1.0, 2.0, 2.0]), torch.tensor([2.0, 1.0, -2.0])) == pytest.approx(0.0)
    assert diagnose.cosine(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])) == pytest.approx(1 / math.sqrt(2))
    assert diagnose.cosine(torch.zeros(2), torch.tensor([1.0, 1.0])) == 0.0


def test_sign_conflicts_after_ties_trim_by_hand():
    # density 0.5 keeps 2 of 4 entries each: [3, 0, 2, 0] and [0, 2, -4, 0]; both keep entry 2, with opposite signs.
    assert diagnose.sign_conflicts([torch.tensor([3.0, -1.0, 2.0, 0.5]), torch.tensor([1.0, 2.0, -4.0, -0.1])], 0.5) == (1, 1)
    # untrimmed: entries 0, 1, 2 are set in both; 1 and 2 disagree.
    assert diagnose.sign_conflicts([torch.tensor([1.0, -1.0, 2.0, 0.0]), torch.tensor([1.0, 1.0, -1.0, 3.0])], 1.0) == (3, 2)


def test_layers_pool_their_tensors_by_hand():
    named = [
        ("model.layers.0.a.weight", [torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0])]),   # dot 1, both set at 0
        ("model.layers.0.b.weight", [torch.tensor([0.0, 2.0]), torch.tensor([0.0, -1.0])]),  # dot -2, conflict at 1
        ("model.layers.1.a.weight", [None, None]),  # no model changes it: skipped
        ("lm_head.weight", [torch.tensor([1.0]), None]),  # one model only: cosine 0, no overlap
    ]
    layer0, other = diagnose.diagnose_tensors(named, density=1.0)
    # layer 0 as one vector: dot 1 - 2 = -1, norms sqrt(1 + 4) and sqrt(1 + 1); 2 of 4 entries set in both, 1 conflicts
    assert layer0.layer == "0" and layer0.cosine == pytest.approx(-1 / math.sqrt(10))
    assert layer0.norms == pytest.approx((math.sqrt(5), math.sqrt(2)))
    assert (layer0.overlap, layer0.conflict) == (0.5, 0.5)
    assert other.layer == diagnose.OTHER and (other.cosine, other.overlap, other.conflict) == (0.0, 0.0, 0.0)
    assert diagnose.overall([layer0, other]) == pytest.approx(
        {"lowest_cosine": -1 / math.sqrt(10), "median_cosine": 0.0, "conflict": 0.5})


# ---- the command line ---------------------------------------------------------------------------------------
def tree_hashes(*roots: Path) -> dict[str, str]:
    files = [p for r in roots for p in ([r] if r.is_file() else sorted(r.rglob("*"))) if p.is_file()]
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def search_args(inputs, out: Path, *extra) -> list:
    return ["merge", inputs["spec"], "--out", out, "--search", *[a for t in inputs["tasks"] for a in ("--eval", t)],
            "--val-rows", "2", *extra]


def test_cli_search_end_to_end_leaves_inputs_untouched(inputs, tmp_path):
    watched = [inputs["spec"], *inputs["tasks"], inputs["root"] / "alpha-eval.jsonl", inputs["root"] / "beta-eval.jsonl",
               inputs["root"] / "alpha-adapter", inputs["root"] / "beta-adapter", inputs["base"]]
    before = tree_hashes(*watched)
    stdout = ok(invoke(*search_args(inputs, tmp_path / "out", "--grid", "method=linear", "--grid", "weights=1:1")))
    assert "linear w=1:1" in stdout and "held out alpha" in stdout
    assert {"model.safetensors", "merge_spec.yaml", "search.jsonl", "search.md", "task_scores.json"} <= {
        p.name for p in (tmp_path / "out").iterdir()}
    assert tree_hashes(*watched) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left beside it


def test_cli_refuses_to_write_into_an_input(inputs):
    fails(invoke(*search_args(inputs, inputs["root"] / "alpha-adapter" / "merged")), "inside the input")


def test_cli_never_replaces_a_folder_holding_a_task_recipe(inputs, tmp_path):
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    recipe = task_dir / "alpha.yaml"
    recipe.write_text(inputs["tasks"][0].read_text())
    before = tree_hashes(task_dir)
    args = ["merge", inputs["spec"], "--out", task_dir, "--search", "--eval", recipe, "--eval", inputs["tasks"][1],
            "--val-rows", "2", "--overwrite"]
    fails(invoke(*args), "contains the task recipe")
    assert tree_hashes(task_dir) == before


def test_an_unsafe_out_is_refused_before_any_candidate_is_scored(inputs, tmp_path):
    scored = []
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    recipe = task_dir / "alpha.yaml"
    recipe.write_text(inputs["tasks"][0].read_text())
    with pytest.raises(TunesmithError, match="contains the task recipe"):
        search(inputs["spec"], [recipe, inputs["tasks"][1]], task_dir, candidates=[X], val_rows=2, overwrite=True,
               progress=False, score_fn=lambda *args: scored.append(args) or 0.0)
    assert scored == []


@pytest.mark.parametrize("case, message", [
    ("eval without search", "add --search"),
    ("search without eval", "--search needs at least one --eval"),
    ("missing eval file", "does not exist"),
    ("merge spec as eval", "is not a task recipe"),
    ("bad grid", "--grid 'speed=1'"),
    ("grid value no merge takes", "candidate 'ties w=1:1 density=1.5' is not a valid merge"),
    ("too few eval rows", "leaves none held out"),
    ("existing out", "exists and is not empty"),
])
def test_cli_bad_inputs_are_one_line_and_write_nothing(inputs, tmp_path, case, message):
    out = tmp_path / "out"
    args = {
        "eval without search": ["merge", inputs["spec"], "--out", out, "--eval", inputs["tasks"][0]],
        "search without eval": ["merge", inputs["spec"], "--out", out, "--search"],
        "missing eval file": ["merge", inputs["spec"], "--out", out, "--search", "--eval", tmp_path / "nope.yaml"],
        "merge spec as eval": ["merge", inputs["spec"], "--out", out, "--search", "--eval", inputs["spec"]],
        "bad grid": search_args(inputs, out, "--grid", "speed=1"),
        "grid value no merge takes": search_args(inputs, out, "--grid", "method=ties", "--grid", "density=1.5",
                                                 "--grid", "weights=1:1"),
        "too few eval rows": [*search_args(inputs, out)[:-2], "--val-rows", "6"],
        "existing out": search_args(inputs, out),
    }[case]
    if case == "existing out":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    fails(invoke(*args), message)
    assert [p.name for p in tmp_path.iterdir()] == (["out"] if case == "existing out" else [])
    if case == "existing out":
        assert (out / "keep.txt").read_text() == "mine"
