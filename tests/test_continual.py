"""Continual learning and per-task adapters: `continual.previous` with progressive / o-lora / merge / separate,
old-task outputs unchanged at the new adapter's init, the self-contained run folder, routing with `--adapter`,
task prefixes in training, eval and chat, and the accuracy matrix of a two-task sequence.

Task 1 (booking, prefix [Booking]) is a 2-step LoRA run whose lora_B weights are then randomised, so its
adapter changes the model visibly; task 2 (shopping, prefix [Shopping]) builds on it.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tunesmith.chat import make_chat_session
from tunesmith.config import load_config
from tunesmith.errors import TunesmithError
from tunesmith.evaluation.run import evaluate_routed
from tunesmith.methods.adapter_stack import attach_previous, merge_previous_into_base, previous_adapters, using_adapters
from tunesmith.regularize.orthogonality import OrthogonalityTerm
from tunesmith.routing import first_user_text, task_routes

from helpers import task_recipe
from oracle import read_rows, script_answers


def _recipe(tmp: Path, model_dir, name: str, rows, held, prefix: str, **extra) -> dict:
    return task_recipe(tmp, model_dir, name, rows, held, prefix, **extra,
                       eval_section={"max_new_tokens": 4, "batch_size": 2, "limit": 2, "general_tokens": 128})


@pytest.fixture(scope="module")
def tasks(tmp_path_factory, tiny_model_dir):
    from tunesmith.demo.booking import generate as booking
    from tunesmith.demo.shopping import generate as shopping
    from tunesmith.training.run import train

    tmp = tmp_path_factory.mktemp("continual")
    b_rows, b_held = booking(n_train=8, n_eval=2, seed=1)
    s_rows, s_held = shopping(n_train=8, n_eval=2, seed=1)
    task1 = _recipe(tmp, tiny_model_dir, "task1", b_rows, b_held, "[Booking]")
    run1 = train(load_config(task1), progress=False).output_dir
    path = run1 / "adapter_model.safetensors"
    g = torch.Generator().manual_seed(0)
    save_file({k: (torch.randn(v.shape, generator=g) * 0.5 if "lora_B" in k else v) for k, v in load_file(path).items()}, path)
    task2 = _recipe(tmp, tiny_model_dir, "task2", s_rows, s_held, "[Shopping]",
                    continual={"previous": [str(run1)], "strategy": "progressive"})
    run2 = train(load_config(task2), progress=False).output_dir
    return {"tmp": tmp, "run1": run1, "run2": run2, "task2": task2}


def _batch(tokenizer):
    text = "<|im_start|>user\n[Booking] Ana booked a table for 2 in Lima on May 4.<|im_end|>\n<|im_start|>assistant\n"
    return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])


@torch.no_grad()
def _logits(model, ids):
    return model(input_ids=ids, use_cache=False).logits


def _train_time_model(config):
    """The model exactly as train() builds it, before the first step."""
    from tunesmith.methods import prepare_model
    from tunesmith.models import load_model

    model = merge_previous_into_base(load_model(config.model), config)
    prepared = prepare_model(model, config)
    attach_previous(prepared, config)
    return prepared.model.eval()


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["progressive", "o-lora", "merge", "separate"])
def test_old_task_outputs_at_new_adapter_init(tasks, tokenizer, tiny_model_dir, strategy):
    from tunesmith.inference import load_for_inference
    from tunesmith.models import load_model

    recipe = dict(tasks["task2"], continual={"previous": [str(tasks["run1"])], "strategy": strategy})
    model = _train_time_model(load_config(recipe))
    ids = _batch(tokenizer)
    old = _logits(load_for_inference(str(tasks["run1"])).model, ids)
    base = _logits(load_model(str(tiny_model_dir)), ids)
    assert (old - base).abs().max() > 1e-2  # task 1's adapter matters
    want = base if strategy == "separate" else old  # separate: the new adapter trains on the untouched base
    torch.testing.assert_close(_logits(model, ids), want, atol=1e-5, rtol=1e-5)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".default." in n for n in trainable)  # only the new adapter trains
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 8192  # r=4 on the tiny model


@pytest.mark.slow
def test_progressive_run_folder_and_routing(tasks, tokenizer):
    from tunesmith.evaluation.run import evaluate
    from tunesmith.inference import load_for_inference

    run1, run2 = tasks["run1"], tasks["run2"]
    meta = json.loads((run2 / "continual.json").read_text())
    assert meta["strategy"] == "progressive"
    assert [a["name"] for a in meta["adapters"]] == ["task1"] and meta["adapters"][0]["task_prefixes"] == ["[Booking]"]
    assert meta["this"]["name"] == "task2" and meta["this"]["stack"] == ["task1", "task2"]
    # Self-contained: task 1's adapter is copied in, unchanged by training task 2.
    assert (run2 / "task1" / "adapter_model.safetensors").read_bytes() == (run1 / "adapter_model.safetensors").read_bytes()
    new = load_file(run2 / "adapter_model.safetensors")
    assert any(v.abs().max() > 0 for k, v in new.items() if "lora_B" in k)

    loaded = load_for_inference(str(run2))
    assert sorted(loaded.model.base_model.active_adapters) == ["default", "task1"]
    ids = _batch(tokenizer)
    routes = {r.name: r for r in task_routes(loaded)}
    assert routes["task1"].stack == ["task1"] and routes["task2"].stack == ["task1", "default"]
    # --adapter task1 serves task 1 exactly as its own run does: no forgetting through routing.
    old = _logits(load_for_inference(str(run1)).model, ids)
    with using_adapters(loaded.model, routes["task1"].stack):
        torch.testing.assert_close(_logits(loaded.model, ids), old, atol=1e-5, rtol=1e-5)
    assert sorted(loaded.model.base_model.active_adapters) == ["default", "task1"]  # restored
    assert (_logits(loaded.model, ids) - old).abs().max() > 1e-4  # both adapters: task 2 moved the model

    # Task 1's eval data through task 2's model with --adapter task1: the same eval loss as task 1's own run.
    routed = evaluate_routed(loaded, load_config(run1 / "config.yaml"), "task1", limit=2, progress=False)
    alone = evaluate(str(run1), limit=2, progress=False)
    assert routed["adapter"] == "task1" and routed["eval_loss"] == pytest.approx(alone["eval_loss"], abs=1e-5)
    with pytest.raises(TunesmithError, match="unknown adapter; this run has task1, task2"):
        evaluate(str(run2), limit=1, progress=False, adapter="nope")


@pytest.mark.slow
def test_task_prefixes_in_training_eval_and_auto_routing(tasks, tokenizer):
    from tunesmith.data.assemble import eval_conversations, prepare_data
    from tunesmith.evaluation.run import evaluate
    from tunesmith.inference import load_for_inference

    config = load_config(tasks["task2"])
    data = prepare_data(config, tokenizer)
    for ex in data.train + data.eval:
        first_user = next(m for m in ex.conversation if m["role"] == "user")
        assert first_user["content"].startswith("[Shopping] Write the shopping list")
    assert all(first_user_text(c).startswith("[Shopping] ") for c, _ in eval_conversations(config))

    report = evaluate(str(tasks["run2"]), progress=False, adapter="auto")
    assert report["routing"] == {"task2": 2}
    # Task 1's eval data through task 2's model, routed by prefix: task 1's adapter alone.
    loaded = load_for_inference(str(tasks["run2"]))
    cfg1 = load_config(tasks["run1"] / "config.yaml")
    auto = evaluate_routed(loaded, cfg1, "auto", progress=False)
    assert auto["routing"] == {"task1": 2}
    assert auto["eval_loss"] == pytest.approx(evaluate(str(tasks["run1"]), progress=False)["eval_loss"], abs=1e-5)


def test_chat_applies_prefix_and_routes(tasks):
    from tunesmith.inference import load_for_inference

    loaded = load_for_inference(str(tasks["run2"]))
    fixed = make_chat_session(loaded, "task1", max_new_tokens=2)
    assert fixed._route_turn("Ana, 2 guests, Lima") == "[Booking] Ana, 2 guests, Lima"  # its task's prefix
    assert list(loaded.model.base_model.active_adapters) == ["task1"]
    auto = make_chat_session(loaded, "auto", max_new_tokens=2)
    assert auto._route_turn("[Shopping] two lemons") == "[Shopping] two lemons"
    assert sorted(loaded.model.base_model.active_adapters) == ["default", "task1"]
    plain = make_chat_session(loaded, None, max_new_tokens=2)  # the run's own task, its prefix
    answer = plain.reply("three eggs")
    assert plain.history[0]["content"] == "[Shopping] three eggs" and isinstance(answer, str)
    with pytest.raises(TunesmithError, match="unknown adapter"):
        make_chat_session(loaded, "task9")


LORA_B = "base_model.model.model.layers.0.self_attn.q_proj"


def serving(model, adapters: dict[str, torch.Tensor]) -> set[str]:
    """The tasks whose adapters the model serves with right now, recognised by one of their lora_B weights."""
    module = model.get_submodule(LORA_B)
    active = model.base_model.active_adapters
    return {task for task, weight in adapters.items()
            for name in active if torch.equal(module.lora_B[name].weight, weight)}


def script_task_answers(tasks, monkeypatch) -> None:
    """Scripted answers (tests/oracle.py) that depend on which adapters serve, not on which run folder holds them.

    Task 1's rows are right while task 1's adapter serves alone; beside task 2's adapter only its first row is
    (task 2 interferes); without it none is. Task 2's rows are right whenever task 2's adapter serves.
    """
    task1 = read_rows(tasks["tmp"] / "task1-eval.jsonl")
    rows = task1 + read_rows(tasks["tmp"] / "task2-eval.jsonl")
    adapters = {t: load_file(tasks[run] / "adapter_model.safetensors")[f"{LORA_B}.lora_B.weight"]
                for t, run in (("task1", "run1"), ("task2", "run2"))}

    def answer(model, i, row):
        now = serving(model, adapters)
        if i < len(task1):
            right = now == {"task1"} or (now == {"task1", "task2"} and i == 0)
        else:
            right = "task2" in now
        return row["output"] if right else "I do not know."

    script_answers(monkeypatch, rows, answer)


def test_accuracy_matrix_from_scripted_answers(tasks, monkeypatch):
    """Unrouted, run 2 serves task 1 with both adapters: half of task 1 is forgotten.

    By hand: R = [[1, 0], [0.5, 1]] (row i: after training task i; column j: task j), average accuracy
    (0.5 + 1) / 2 = 0.75, BWT = R[1][0] - R[0][0] = -0.5.
    """
    from tunesmith.evaluation.forgetting import accuracy_matrix

    script_task_answers(tasks, monkeypatch)
    seq = accuracy_matrix([str(tasks["run1"]), str(tasks["run2"])], limit=2)
    assert seq["R"] == [[1.0, 0.0], [0.5, 1.0]]
    assert seq["average_accuracy"] == 0.75
    assert seq["bwt"] == -0.5


@pytest.mark.slow
def test_sequence_accuracy_matrix(tasks, monkeypatch):
    """Routed: run 2 serves task 1 with task 1's adapter alone, so nothing is forgotten.

    By hand: R = [[1, 0], [1, 1]], average accuracy 1, BWT = R[1][0] - R[0][0] = 0.
    """
    from tunesmith.evaluation.forgetting import forgetting_report

    script_task_answers(tasks, monkeypatch)
    report = forgetting_report(str(tasks["run2"]), limit=1, adapter="auto", progress=False)
    assert report["task"]["score"] == 1.0
    seq = report["sequence"]  # the sequence comes from continual.previous
    assert seq["runs"] == [str(tasks["run1"].resolve()), str(tasks["run2"])]
    assert seq["R"] == [[1.0, 0.0], [1.0, 1.0]]
    assert seq["average_accuracy"] == 1.0 and seq["bwt"] == 0.0
    assert report["general"]["base_perplexity"] != report["general"]["perplexity"]


def test_o_lora_penalty_and_run(tasks):
    from tunesmith.training.run import train

    recipe = dict(tasks["task2"], continual={"previous": [str(tasks["run1"])], "strategy": "o-lora", "orthogonal_lambda": 2.0},
                  output_dir=str(tasks["tmp"] / "olora"))
    model = _train_time_model(load_config(recipe))
    term = OrthogonalityTerm(model, 2.0)
    want = 0.0
    for module in model.modules():
        a = getattr(module, "lora_A", None)
        if isinstance(a, torch.nn.ModuleDict) and "default" in a:
            want += ((a["task1"].weight @ a["default"].weight.T) ** 2).sum().item()
    assert len(term.pairs) == 14 and term.penalty().item() == pytest.approx(2.0 * want, rel=1e-5)
    term.penalty().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all("lora_A.default" in n for n in grads)
    summary = train(load_config(recipe), progress=False).summary
    assert summary["regularize"]["o-lora"] == {"orthogonal_lambda": 2.0}


def test_merge_strategy_run_loads(tasks, tokenizer):
    from tunesmith.inference import load_for_inference
    from tunesmith.training.run import train

    recipe = dict(tasks["task2"], continual={"previous": [str(tasks["run1"])], "strategy": "merge"},
                  output_dir=str(tasks["tmp"] / "merged"))
    run = train(load_config(recipe), progress=False).output_dir
    loaded = load_for_inference(str(run))
    assert json.loads((run / "continual.json").read_text())["this"]["stack"] == ["task1", "merged"]
    assert sorted(loaded.model.base_model.active_adapters) == ["default", "task1"]
    assert torch.isfinite(_logits(loaded.model, _batch(tokenizer))).all()


def test_continual_errors(tasks, tmp_path, tiny_model_dir):
    base = dict(tasks["task2"], output_dir=str(tmp_path / "x"))
    with pytest.raises(TunesmithError, match="continual.previous needs method.name lora or loraplus"):
        load_config(dict(base, method={"name": "full"}, continual={"previous": [str(tasks["run1"])]}))
    with pytest.raises(TunesmithError, match="not a tunesmith run folder"):
        previous_adapters(load_config(dict(base, continual={"previous": [str(tmp_path)]})))
    other = dict(base, model=str(tmp_path / "other-model"), continual={"previous": [str(tasks["run1"])]})
    with pytest.raises(TunesmithError, match="adapters only apply to the base they were trained on"):
        previous_adapters(load_config(other))
    with pytest.raises(TunesmithError, match="must be one of"):
        load_config(dict(base, continual={"previous": [str(tasks["run1"])], "strategy": "ewc"}))


def test_distill_teacher_in_a_progressive_run_is_the_previous_model(tasks, tokenizer):
    """KD is 0 at the new adapter's init when the teacher is base + task 1 (not the bare base)."""
    from tunesmith.data.collate import PaddingFreeCollator
    from tunesmith.modeling import decoder_body
    from tunesmith.regularize.distill import DistillTerm

    model = _train_time_model(load_config(tasks["task2"]))
    ids = _batch(tokenizer)[0].tolist()
    inputs = PaddingFreeCollator()([{"input_ids": ids, "labels": ids}])
    inputs.pop("attention_mask")
    hidden = decoder_body(model)(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"], use_cache=False).last_hidden_state
    previous = DistillTerm(model, 0.5, 2.0, teacher_adapters=["task1"])
    previous(model, inputs, hidden)
    assert previous.last["kd"] == pytest.approx(0.0, abs=1e-6)
    assert sorted(model.base_model.active_adapters) == ["default", "task1"]  # restored after the teacher pass
    bare = DistillTerm(model, 0.5, 2.0)
    bare(model, inputs, hidden)
    assert bare.last["kd"] > 1e-3
