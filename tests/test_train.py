"""`tunesmith.train`: the run folder it writes, LoRA parameters and gradients, seeds, overwrite/resume, and
that the trainer sees labels with padding masked by position (pad id == eos id for SmolLM2).

Everything runs on the tiny random Llama from conftest (2 layers, hidden 64) for a handful of steps.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tunesmith.config import load_config
from tunesmith.data.collate import PaddingCollator
from tunesmith.data.assemble import prepare_data
from tunesmith.data.masking import IGNORE_INDEX
from tunesmith.errors import TunesmithError
from tunesmith.training.run import train

from helpers import write_jsonl

IM_END = "<|im_end|>"


def small_recipe(tmp: Path, model_dir: Path, *, n_train: int = 24, n_eval: int = 8, **train_overrides) -> dict:
    """A recipe dict for the tiny model, data written under tmp; `train_overrides` replace train.* keys."""
    from tunesmith.demo.booking import generate

    tmp.mkdir(parents=True, exist_ok=True)
    train_rows, eval_rows = generate(n_train=n_train, n_eval=max(n_eval, 1), seed=1)
    write_jsonl(tmp / "train.jsonl", train_rows)
    data = {"train": str(tmp / "train.jsonl"), "max_length": 256}
    if n_eval:
        write_jsonl(tmp / "eval.jsonl", eval_rows[:n_eval])
        data["eval"] = str(tmp / "eval.jsonl")
    else:
        data["eval_split"] = 0.0  # no eval at all: faster
    t = {"max_steps": 4, "batch_size": 4, "lr": 1e-3, "logging_steps": 1, "save_steps": 2, "bf16": False}
    t.update(train_overrides)
    return {
        "model": str(model_dir),
        "data": data,
        "method": {"name": "lora", "r": 4, "alpha": 8},
        "train": t,
        "eval": {"scorer": "json_match", "max_new_tokens": 8, "batch_size": 4, "limit": 4},
        "output_dir": str(tmp / "run"),
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """One 4-step run (logging every step, checkpoints at 2 and 4), shared by the read-only tests."""
    tmp = tmp_path_factory.mktemp("train-shared")
    recipe = small_recipe(tmp, tiny_model_dir)
    config = load_config(recipe)
    result = train(config, progress=False)
    return config, result


# --- the run folder -------------------------------------------------------------------------------


def test_run_folder_contents(trained, tokenizer):
    from transformers import AutoTokenizer

    config, result = trained
    run = Path(config.output_dir)
    assert result.output_dir == run

    for name in ("adapter_config.json", "adapter_model.safetensors", "config.yaml", "metrics.jsonl",
                 "summary.json", "data_stats.json", "tokenizer.json", "tokenizer_config.json"):
        assert (run / name).is_file(), name

    adapter_cfg = json.loads((run / "adapter_config.json").read_text())
    assert adapter_cfg["peft_type"] == "LORA"
    assert adapter_cfg["r"] == 4 and adapter_cfg["lora_alpha"] == 8
    weights = load_file(run / "adapter_model.safetensors")
    assert any("lora_A" in k for k in weights) and any("lora_B" in k for k in weights)

    # The tokenizer saved with the run carries the chat template it was trained with.
    saved_tok = AutoTokenizer.from_pretrained(run)
    assert saved_tok.chat_template == tokenizer.chat_template
    assert IM_END in saved_tok.chat_template

    # config.yaml reads back equal to the config that trained the run.
    assert load_config(run / "config.yaml") == config

    # metrics.jsonl: every line is JSON; one line with loss per logging step (logging_steps=1, 4 steps).
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    loss_lines = [r for r in records if "loss" in r]
    assert [r["step"] for r in loss_lines] == [1, 2, 3, 4]
    for r in loss_lines:
        assert isinstance(r["loss"], float) and r["loss"] > 0
        assert "learning_rate" in r
        assert r["tokens_per_second"] > 0

    summary = json.loads((run / "summary.json").read_text())
    assert summary == result.summary
    assert summary["steps"] == 4
    assert summary["method"] == "lora"
    for key in ("train_loss", "eval_loss", "tokens_seen", "tokens_per_second", "trainable_parameters", "total_parameters"):
        assert key in summary, key

    stats = json.loads((run / "data_stats.json").read_text())
    assert stats["train"]["rows"] == 24 and stats["train"]["examples"] == 24
    assert stats["eval"]["rows"] == 8 and stats["eval"]["examples"] == 8
    assert 0 < stats["train"]["supervised_tokens"] < stats["train"]["tokens"]


def test_trainable_parameters_match_peft(trained, tiny_model_dir):
    from peft import get_peft_model

    from tunesmith.methods.lora import lora_config
    from tunesmith.models import load_model

    config, result = trained
    fresh = get_peft_model(load_model(str(tiny_model_dir)), lora_config(config))
    trainable, total = fresh.get_nb_trainable_parameters()
    assert result.summary["trainable_parameters"] == trainable
    assert result.summary["total_parameters"] == total
    # By hand: r=4 on every linear layer of 2 layers, hidden 64, kv dim 32 (2 of 4 heads), mlp 128.
    per_layer = 4 * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 128) * 2 + (128 + 64))
    assert trainable == 2 * per_layer == 8192


# --- determinism ----------------------------------------------------------------------------------


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(Path(run) / "adapter_model.safetensors")


@pytest.mark.slow
def test_same_seed_bit_identical_other_seed_differs(tmp_path, tiny_model_dir):
    def run(name: str, seed: int) -> dict[str, torch.Tensor]:
        recipe = small_recipe(tmp_path / name, tiny_model_dir, n_train=8, n_eval=0,
                              max_steps=2, batch_size=2, warmup=0, seed=seed, save_steps=100)
        return _adapter(train(load_config(recipe), progress=False).output_dir)

    a, b, c = run("a", 7), run("b", 7), run("c", 8)
    assert a.keys() == b.keys() == c.keys()
    # Training moved the adapter (lora_B starts at zero).
    assert all(a[k].abs().sum() > 0 for k in a if "lora_B" in k)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs between two runs with the same seed"
    assert any(not torch.equal(a[k], c[k]) for k in a), "a different seed gave identical adapter weights"


# --- overwrite and resume -------------------------------------------------------------------------


def test_non_empty_output_dir_refused_then_overwritten(tmp_path, tiny_model_dir):
    recipe = small_recipe(tmp_path, tiny_model_dir, n_train=4, n_eval=0, max_steps=1, batch_size=2)
    out = Path(recipe["output_dir"])
    out.mkdir()
    (out / "stale.txt").write_text("earlier work")
    config = load_config(recipe)

    with pytest.raises(TunesmithError) as exc:
        train(config, progress=False)
    msg = str(exc.value)
    assert f"output_dir '{out}' already exists and is not empty" in msg
    assert "--overwrite" in msg and "--resume" in msg
    assert (out / "stale.txt").exists()  # refused before touching anything

    result = train(config, overwrite=True, progress=False)
    assert not (out / "stale.txt").exists()
    assert (out / "adapter_model.safetensors").is_file()
    assert result.summary["steps"] == 1


def test_num_threads_sets_torch_threads_and_zero_keeps_the_default(tmp_path, tiny_model_dir, monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    recipe = small_recipe(tmp_path, tiny_model_dir, n_train=4, n_eval=0, max_steps=1, batch_size=2)
    train(load_config({**recipe, "train": {**recipe["train"], "num_threads": 1}}), progress=False)
    assert calls == [1]
    train(load_config({**recipe, "output_dir": str(tmp_path / "default")}), progress=False)
    assert calls == [1]


def test_resume_without_checkpoint_fails(tmp_path, tiny_model_dir):
    recipe = small_recipe(tmp_path, tiny_model_dir, n_train=4, n_eval=0, max_steps=1)
    with pytest.raises(TunesmithError) as exc:
        train(load_config(recipe), resume=True, progress=False)
    assert str(exc.value) == (
        f"--resume: no checkpoint in '{recipe['output_dir']}' (checkpoints are folders named checkpoint-N); "
        "train without --resume to start from scratch"
    )
    assert not Path(recipe["output_dir"]).exists() or not any(Path(recipe["output_dir"]).iterdir())


def test_resume_continues_from_last_checkpoint(trained, tmp_path):
    config, _ = trained
    run = tmp_path / "resumed"
    shutil.copytree(config.output_dir, run)
    assert (run / "checkpoint-4").is_dir()
    resumed = config.model_copy(deep=True)
    resumed.output_dir = str(run)
    resumed.train.max_steps = 6

    result = train(resumed, resume=True, progress=False)
    assert result.summary["steps"] == 6
    state = json.loads((run / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    loss_steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    # Steps 1-4 from the first run, then 5 and 6 only (no restart from step 1).
    assert loss_steps == [1, 2, 3, 4, 5, 6]


class Interrupted(Exception):
    """Stands in for a crash or Ctrl-C in the middle of a run."""


def _interrupt_after_logging(monkeypatch, step: int) -> None:
    """Make the run stop right after `step` is written to metrics.jsonl, before any checkpoint of that step."""
    from tunesmith.training.callbacks import MetricsFileCallback

    original = MetricsFileCallback.on_log

    def crashing(self, args, state, control, logs=None, **kwargs):
        original(self, args, state, control, logs=logs, **kwargs)
        if state.global_step == step and logs and "loss" in logs:
            raise Interrupted(f"stopped after step {step}")

    monkeypatch.setattr(MetricsFileCallback, "on_log", crashing)


def _loss_rows(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (Path(run) / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def _count_fisher_computations(monkeypatch) -> list[int]:
    from tunesmith.regularize import ewc

    calls, original = [], ewc.diagonal_fisher
    monkeypatch.setattr(ewc, "diagonal_fisher", lambda *a, **k: (calls.append(1), original(*a, **k))[1])
    return calls


@pytest.mark.slow
@pytest.mark.parametrize("ewc", [False, True], ids=["plain", "ewc"])
def test_interrupted_run_resumed_equals_uninterrupted(tmp_path, tiny_model_dir, monkeypatch, ewc):
    """Default config (LoRA dropout, shuffled order, the fast path): a run stopped after step 3, its
    last checkpoint at step 2, resumed to step 4 (in the second epoch), ends with the uninterrupted run's
    adapter, logs each step once with the uninterrupted run's values, and (EWC, reference: the task's own
    data) reuses the stored Fisher. lambda is large enough that training without the penalty differs."""
    def recipe(name: str) -> dict:
        r = small_recipe(tmp_path / name, tiny_model_dir, n_train=12, n_eval=0, max_steps=4, batch_size=4, save_steps=2)
        if ewc:
            r["regularize"] = {"ewc": {"lambda": 1e4, "samples": 3, "reference": r["data"]["train"]}}
        return r

    fisher_calls = _count_fisher_computations(monkeypatch)
    whole = train(load_config(recipe("whole")), progress=False).output_dir
    assert len(fisher_calls) == (1 if ewc else 0)

    config = load_config(recipe("split"))
    with monkeypatch.context() as m:
        _interrupt_after_logging(m, 3)
        with pytest.raises(Interrupted):
            train(config, progress=False)
    split = Path(config.output_dir)
    assert [r["step"] for r in _loss_rows(split)] == [1, 2, 3]
    assert sorted(p.name for p in split.glob("checkpoint-*")) == ["checkpoint-2"]

    fisher_calls.clear()
    result = train(config, resume=True, progress=False)
    assert result.summary["steps"] == 4
    if ewc:
        assert fisher_calls == [], "the resumed run recomputed the Fisher instead of reading ewc.safetensors"
        assert result.summary["regularize"]["ewc"]["samples"] == "from ewc.safetensors"

    expected, got = _loss_rows(whole), _loss_rows(split)
    assert [r["step"] for r in got] == [1, 2, 3, 4], "each step once in metrics.jsonl after a resume"
    for e, g in zip(expected, got):
        assert g["loss"] == pytest.approx(e["loss"], rel=1e-6), f"step {e['step']}"
        assert g["grad_norm"] == pytest.approx(e["grad_norm"], rel=1e-6), f"step {e['step']}"
    a, b = _adapter(whole), _adapter(split)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


def test_metrics_rows_after_checkpoint_dropped_on_resume(tmp_path):
    """On resume the callback keeps rows up to the checkpoint's step (train and eval alike), drops the
    later ones and a torn last line, and leaves no temporary file behind."""
    from types import SimpleNamespace

    from tunesmith.training.callbacks import MetricsFileCallback, ProgressCallback

    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}, {"step": 2, "eval_loss": 2.7},
            {"step": 3, "loss": 2.2}, {"step": 4, "loss": 2.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "lo')
    callback = MetricsFileCallback(path, ProgressCallback(enabled=False))

    callback.on_train_begin(None, SimpleNamespace(global_step=2), None)
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows[:3]
    assert path.read_text().endswith("\n")
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]

    callback.on_train_begin(None, SimpleNamespace(global_step=0), None)  # a fresh run: nothing to drop
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows[:3]


# --- loss masking reaches the trainer -------------------------------------------------------------


def test_collator_masks_pads_by_position_keeps_end_of_turn(tokenizer, tiny_recipe):
    config = load_config(tiny_recipe)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids(IM_END)
    data = prepare_data(config, tokenizer)
    examples = sorted(data.train, key=lambda e: len(e.input_ids))
    short, long = examples[0], examples[-1]
    assert len(short.input_ids) < len(long.input_ids)

    batch = PaddingCollator(tokenizer.pad_token_id)([
        {"input_ids": short.input_ids, "labels": short.labels},
        {"input_ids": long.input_ids, "labels": long.labels},
    ])
    n = len(short.input_ids)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape == labels.shape == mask.shape == (2, len(long.input_ids))
    # Pads: eos id in input_ids, -100 in labels, 0 in the mask.
    assert (ids[0, n:] == tokenizer.pad_token_id).all()
    assert (labels[0, n:] == IGNORE_INDEX).all()
    assert (mask[0, n:] == 0).all() and (mask[0, :n] == 1).all() and (mask[1] == 1).all()
    # The real end of turn is the same id as the pad, but its label is kept (by position).
    for row, ex in ((0, short), (1, long)):
        last = max(i for i, l in enumerate(ex.labels) if l != IGNORE_INDEX)
        assert ex.input_ids[last] == tokenizer.eos_token_id
        assert labels[row, last].item() == tokenizer.eos_token_id
        assert labels[row, : len(ex.labels)].tolist() == ex.labels


def _record_training_batches(monkeypatch):
    from transformers import Trainer

    seen = []
    original = Trainer.training_step

    def recording(self, model, inputs, *args, **kwargs):
        seen.append({k: v.detach().cpu().clone() for k, v in inputs.items() if torch.is_tensor(v)})
        return original(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", recording)
    return seen


def _train_recording(tmp_path, tiny_model_dir, monkeypatch, padding_free: bool | None):
    from tunesmith.config import TrainConfig

    extra = {}
    if "padding_free" in TrainConfig.model_fields:
        extra["padding_free"] = padding_free
    elif padding_free:
        pytest.skip("this version has no train.padding_free")
    seen = _record_training_batches(monkeypatch)
    recipe = small_recipe(tmp_path, tiny_model_dir, n_train=8, n_eval=0, max_steps=2, batch_size=4,
                          save_steps=100, **extra)
    train(load_config(recipe), progress=False)
    assert len(seen) == 2
    return seen


def _check_example(ids: torch.Tensor, labels: torch.Tensor, eos: int) -> None:
    """One example's tokens and labels as the trainer got them: supervised labels are the tokens
    themselves, and the last supervised one is the end of turn (eos id, which is also the pad id)."""
    keep = labels != IGNORE_INDEX
    assert keep.any()
    assert torch.equal(labels[keep], ids[keep])
    last = int(keep.nonzero().flatten()[-1])
    assert labels[last].item() == eos == ids[last].item()


def test_trainer_receives_position_masked_labels(tmp_path, tiny_model_dir, tokenizer, monkeypatch):
    """Padded batches (train.padding_free: false): pads carry no loss, every row's end of turn does."""
    seen = _train_recording(tmp_path, tiny_model_dir, monkeypatch, padding_free=False)
    eos = tokenizer.eos_token_id
    padded_rows = 0
    for batch in seen:
        ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
        assert ids.shape[0] == 4 and "position_ids" not in batch
        assert (labels[mask == 0] == IGNORE_INDEX).all()
        assert (ids[mask == 0] == eos).all()
        for row in range(ids.shape[0]):
            n = int(mask[row].sum())
            assert (mask[row, :n] == 1).all()
            padded_rows += n < ids.shape[1]
            _check_example(ids[row, :n], labels[row, :n], eos)
    assert padded_rows > 0, "no batch had padding; the test would prove nothing"


def test_trainer_receives_padding_free_rows(tmp_path, tiny_model_dir, tokenizer, monkeypatch):
    """Padding-free batches: one row, no pad at all, positions restart per example, and every example
    keeps its end-of-turn label while its first token (the neighbour boundary) carries none."""
    seen = _train_recording(tmp_path, tiny_model_dir, monkeypatch, padding_free=True)
    eos = tokenizer.eos_token_id
    for batch in seen:
        ids, labels, pos = batch["input_ids"], batch["labels"], batch["position_ids"]
        assert ids.shape[0] == 1 and ids.shape == labels.shape == pos.shape
        starts = (pos[0] == 0).nonzero().flatten().tolist()
        assert starts[0] == 0 and len(starts) == 4  # batch_size examples in the row
        bounds = starts + [ids.shape[1]]
        for a, b in zip(bounds, bounds[1:]):
            assert pos[0, a:b].tolist() == list(range(b - a))
            assert labels[0, a].item() == IGNORE_INDEX
            _check_example(ids[0, a:b], labels[0, a:b], eos)


# --- LoRA gradients -------------------------------------------------------------------------------


def test_lora_gradients_nonzero_for_every_adapted_layer(tiny_recipe, tiny_model_dir, tokenizer):
    from tunesmith.methods import prepare_model
    from tunesmith.models import load_model

    config = load_config(tiny_recipe)
    torch.manual_seed(0)
    prepared = prepare_model(load_model(str(tiny_model_dir)), config)
    # prepare_model returns a PreparedModel (or, in older code, a (model, groups) tuple).
    model = prepared.model if hasattr(prepared, "model") else prepared[0]
    model.train()
    data = prepare_data(config, tokenizer)
    batch = PaddingCollator(tokenizer.pad_token_id)(
        [{"input_ids": e.input_ids, "labels": e.labels} for e in data.train[:2]]
    )
    adapted = {name: m for name, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    # all-linear on a 2-layer Llama: q, k, v, o, gate, up, down in each layer.
    assert len(adapted) == 14

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**batch).loss.backward()
    for name, m in adapted.items():
        assert m.lora_B["default"].weight.grad.abs().sum() > 0, f"{name}: lora_B has no gradient"
    optimizer.step()
    optimizer.zero_grad()

    # After one step lora_B is non-zero, so lora_A gets a gradient too.
    model(**batch).loss.backward()
    for name, m in adapted.items():
        assert m.lora_A["default"].weight.grad.abs().sum() > 0, f"{name}: lora_A has no gradient after one step"
        assert m.lora_B["default"].weight.grad.abs().sum() > 0, f"{name}: lora_B has no gradient after one step"
    frozen = [n for n, p in model.named_parameters() if "lora_" not in n]
    assert frozen and all(not p.requires_grad and p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize("method", ["lora", "dora", "vera", "ia3", "adalora"])
def test_bf16_stores_the_frozen_base_in_bf16_and_what_trains_in_fp32(tmp_path, tiny_model_dir, method):
    """With bf16 compute the frozen base is loaded in bf16 (no per-step autocast copies); adapters stay fp32."""
    from tunesmith.methods import load_kwargs, prepare_model
    from tunesmith.models import load_model

    recipe = small_recipe(tmp_path, tiny_model_dir, n_eval=0, bf16=True)
    recipe["method"] = {"name": method, **({"target_r": 2, "init_r": 4} if method == "adalora" else {})}
    config = load_config(recipe)
    prepared = prepare_model(load_model(config.model, **load_kwargs(config)), config, total_steps=10)
    frozen = {p.dtype for p in prepared.model.parameters() if not p.requires_grad}
    trains = {p.dtype for p in prepared.model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trains == {torch.float32}


@pytest.mark.parametrize("method, bf16", [("full", True), ("freeze", True), ("lora", False)])
def test_weights_that_train_and_bf16_off_stay_fp32(tmp_path, tiny_model_dir, method, bf16):
    """A method that trains the weights keeps every weight fp32 (exact saved model); bf16 off loads fp32."""
    from tunesmith.methods import load_kwargs, prepare_model
    from tunesmith.models import load_model

    recipe = small_recipe(tmp_path, tiny_model_dir, n_eval=0, bf16=bf16)
    recipe["method"] = {"name": method}
    config = load_config(recipe)
    prepared = prepare_model(load_model(config.model, **load_kwargs(config)), config)
    assert {p.dtype for p in prepared.model.parameters()} == {torch.float32}


def test_bf16_lora_run_trains_and_saves_an_fp32_adapter(tmp_path, tiny_model_dir):
    config = load_config(small_recipe(tmp_path, tiny_model_dir, n_eval=0, bf16=True, max_steps=3))
    summary = train(config, progress=False).summary
    assert summary["bf16"] is True and summary["train_loss"] > 0
    adapter = load_file(str(Path(config.output_dir) / "adapter_model.safetensors"))
    assert {t.dtype for t in adapter.values()} == {torch.float32}
    assert any(t.abs().sum() > 0 for n, t in adapter.items() if "lora_B" in n)  # B starts at zero: it trained
