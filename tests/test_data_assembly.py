"""One way from a recipe to training examples: with task prefixes, weighted mixing and replay set,
`data stats` (API and CLI), `data inspect`, `train --dry-run` and `eval` see exactly what training does.

The reference is what the trainer's collator receives during one real training run (recorded by
wrapping the collators), never the data module's own output.
"""
from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from tunesmith.cli import app
from tunesmith.config import load_config
from tunesmith.data.collate import PaddingCollator, PaddingFreeCollator

from helpers import write_jsonl

PREFIXES = ("[Booking]", "[Shopping]")


def _recipe(tmp, model_dir) -> dict:
    from tunesmith.demo.booking import generate as booking
    from tunesmith.demo.shopping import generate as shopping

    write_jsonl(tmp / "booking.jsonl", booking(n_train=12, n_eval=1, seed=1)[0])
    write_jsonl(tmp / "shopping.jsonl", shopping(n_train=6, n_eval=1, seed=2)[0])
    return {
        "model": str(model_dir),
        "data": {
            "train": [{"path": str(tmp / "booking.jsonl"), "weight": 1, "task_prefix": PREFIXES[0]},
                      {"path": str(tmp / "shopping.jsonl"), "weight": 2, "task_prefix": PREFIXES[1]}],
            "eval_split": 0.2,
            "max_length": 256,
        },
        "regularize": {"replay": {"ratio": 0.2}},
        "method": {"name": "lora", "r": 4, "alpha": 8},
        "train": {"batch_size": 4, "lr": 1e-3, "bf16": False, "eval_each_epoch": False, "save_steps": 100},
        "output_dir": str(tmp / "run"),
    }


def _record_collators(mp: pytest.MonkeyPatch) -> dict:
    """Every (input_ids, labels) a collator is handed, under "train", or "eval" while Trainer.evaluate runs."""
    from transformers import Trainer

    seen: dict = {"train": [], "eval": []}
    phase = ["train"]
    for cls in (PaddingCollator, PaddingFreeCollator):
        def recording(self, features, _original=cls.__call__):
            seen[phase[0]].extend((list(f["input_ids"]), list(f["labels"])) for f in features)
            return _original(self, features)

        mp.setattr(cls, "__call__", recording)

    def evaluating(self, *args, _original=Trainer.evaluate, **kwargs):
        phase[0] = "eval"
        try:
            return _original(self, *args, **kwargs)
        finally:
            phase[0] = "train"

    mp.setattr(Trainer, "evaluate", evaluating)
    return seen


def _counts(features: list[tuple[list[int], list[int]]]) -> dict:
    return {
        "examples": len(features),
        "tokens": sum(len(ids) for ids, _ in features),
        "supervised_tokens": sum(sum(1 for t in labels if t != -100) for _, labels in features),
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """One epoch of real training on the recipe; what the collator received in it."""
    from tunesmith.training.run import train

    tmp = tmp_path_factory.mktemp("assembly")
    recipe = _recipe(tmp, tiny_model_dir)
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.MonkeyPatch.context() as mp:
        seen = _record_collators(mp)
        train(load_config(recipe), progress=False)
    assert seen["train"] and seen["eval"]
    return {"recipe": recipe, "path": path, "seen": seen}


@pytest.fixture
def run_tokenizer(tiny_model_dir):
    """The run's own tokenizer, loaded as the CLI loads it (data.chat_template would change it in place)."""
    from tunesmith.models import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


def test_data_stats_counts_what_the_collator_receives(trained, run_tokenizer):
    from tunesmith.data.report import data_stats

    seen = trained["seen"]
    expected = {"train": _counts(seen["train"]), "eval": _counts(seen["eval"])}
    # 14 task rows after holding out round(0.2 * 18) = 4, mixed 1:2 as 5 + 9, and round(0.2 * 14 / 0.8) = 4 replay.
    assert expected["train"]["examples"] == 18 and expected["eval"]["examples"] == 4
    stats = data_stats(load_config(trained["recipe"]), run_tokenizer)
    cli = CliRunner().invoke(app, ["data", "stats", str(trained["path"]), "--json"])
    assert cli.exit_code == 0, cli.output
    for shown in (stats, json.loads(cli.stdout)):
        for split in ("train", "eval"):
            assert {k: shown[split][k] for k in expected[split]} == expected[split], split
        assert [d["used"] for d in shown["mix"]["datasets"]] == [5, 9] and shown["mix"]["replay"]["examples"] == 4


def test_data_inspect_shows_the_first_examples_training_reads(trained, run_tokenizer):
    from tunesmith.data.report import inspect_examples

    first = trained["seen"]["train"][:6]  # mixed data is read in its given order
    tables = inspect_examples(load_config(trained["recipe"]), run_tokenizer, n=6)
    assert [[t["id"] for t in e["tokens"]] for e in tables] == [ids for ids, _ in first]
    assert [[t["loss"] for t in e["tokens"]] for e in tables] == [[t != -100 for t in labels] for _, labels in first]
    texts = ["".join(t["text"] for t in e["tokens"]) for e in tables]
    assert any(PREFIXES[0] in t for t in texts) and any(PREFIXES[1] in t for t in texts)


def test_dry_run_measures_the_examples_training_receives(trained, run_tokenizer, monkeypatch):
    from tunesmith.data.report import data_stats
    from tunesmith.planning import measure as measure_module

    captured = {}
    monkeypatch.setattr(measure_module, "measure", lambda config, **kw: captured.update(kw) or "measured")
    config = load_config(trained["recipe"])
    result = measure_module.dry_run(config)
    assert result["data"] == data_stats(config, run_tokenizer)
    received = trained["seen"]["train"]
    examples = captured["examples"]
    assert len(examples) == 2 * config.train.batch_size  # 2 steps of one micro batch each
    assert all((e["input_ids"], e["labels"]) in received for e in examples)
    longest = sorted((len(ids) for ids, _ in received), reverse=True)[: len(examples)]
    assert sorted((len(e["input_ids"]) for e in examples), reverse=True) == longest


def test_eval_scores_the_conversations_training_held_out(trained):
    from tunesmith.data.assemble import eval_conversations

    convs = eval_conversations(load_config(trained["recipe"]))
    assert len(convs) == len(trained["seen"]["eval"])
    for conv, where in convs:
        prefix = PREFIXES[0] if "booking.jsonl" in where else PREFIXES[1]
        assert next(m["content"] for m in conv if m["role"] == "user").startswith(prefix + " ")


def test_data_check_sees_the_task_prefix(tmp_path, tokenizer):
    from tunesmith.data.report import check_data

    write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Say hi", "output": "Hi!"}] * 3)
    data = {"train": str(tmp_path / "d.jsonl"), "eval_split": 0.0, "max_length": 64}
    long_prefix = "[" + "very " * 60 + "long task]"  # 60 words: the prefixed examples no longer fit in 64 tokens
    warnings = lambda cfg: [f.message for f in check_data(cfg, tokenizer) if f.level == "warning"]  # noqa: E731
    assert warnings(load_config({"data": data})) == []
    assert any("3 of 3 examples are longer" in m for m in warnings(load_config({"data": {**data, "task_prefix": long_prefix}})))
