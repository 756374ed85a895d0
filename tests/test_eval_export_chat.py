"""Scorers, eval loss/perplexity, `evaluate`, batched generation, `export` (merged and adapter-only), and chat.

Runs on the tiny random Llama from conftest. The shared run is trained for two steps and then its
lora_B weights are set to random values, so the adapter changes the logits visibly and a merge that
dropped or mis-scaled it would fail the logits comparisons.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from tunesmith.config import load_config
from tunesmith.errors import TunesmithError
from tunesmith.evaluation.scorers import contains, exact_match, json_match

from helpers import write_jsonl
from oracle import read_rows, right_json, script_answers, wrong_json

IM_END = "<|im_end|>"


# --- scorers --------------------------------------------------------------------------------------


def test_exact_match_normalises_whitespace():
    assert exact_match("  Paris\n", "Paris") == 1.0
    assert exact_match("New   York\tCity", "New York City") == 1.0
    assert exact_match("new york city", "New York City") == 0.0  # case matters
    assert exact_match("Paris.", "Paris") == 0.0
    assert exact_match("", "") == 1.0


def test_json_match():
    ref = '{"name": "Ana", "city": "Lima", "guests": 2}'
    assert json_match('{"guests": 2, "city": "Lima", "name": "Ana"}', ref) == 1.0  # key order
    assert json_match('{"name":"Ana","city":"Lima","guests":2}', ref) == 1.0  # whitespace
    assert json_match('```json\n{"name": "Ana", "city": "Lima", "guests": 2}\n```', ref) == 1.0  # fenced
    assert json_match('```\n{"name": "Ana", "city": "Lima", "guests": 2}\n```', ref) == 1.0  # fence, no tag
    assert json_match('{"name": "Ana", "city": "Lima", "guests": 2}\nHope this helps!', ref) == 1.0  # trailing text
    assert json_match('Here it is: {"name": "Ana", "city": "Lima", "guests": 2}', ref) == 1.0  # leading text
    assert json_match('{"name": "Ana", "city": "Lima", "guests": "2"}', ref) == 0.0  # value type matters
    assert json_match('{"name": "Ana", "city": "Lima"}', ref) == 0.0  # missing key
    assert json_match('{"name": "Ana", "city": "Lima", "guests": 2, "x": 1}', ref) == 0.0  # extra key
    assert json_match('{"name": "Ana", "city": "Lima", "guests": 2', ref) == 0.0  # invalid JSON
    assert json_match("no json here", ref) == 0.0
    assert json_match("", ref) == 0.0
    assert json_match('{"ok": true}', '{"ok": 1}') == 0.0  # a JSON boolean is not a number
    assert json_match('{"ok": 0}', '{"ok": false}') == 0.0
    assert json_match('{"ok": [1, true]}', '{"ok": [1, true]}') == 1.0


def test_json_match_reads_the_prediction_loosely_and_the_reference_strictly():
    """Only the prediction may carry text around its JSON: swapped arguments would fail on the first line."""
    ref = '{"name": "Ana"}'
    assert json_match('Sure: {"name": "Ana"}', ref) == 1.0
    with pytest.raises(json.JSONDecodeError):
        json_match(ref, 'Sure: {"name": "Ana"}')


def test_contains():
    assert contains("The city is Paris, France.", "paris") == 1.0
    assert contains("The city is  Paris", " Paris ") == 1.0
    assert contains("The city is Lyon", "Paris") == 0.0
    assert contains("Paris", "The city is Paris") == 0.0  # the reference must be inside the prediction, not vice versa


# --- shared run -----------------------------------------------------------------------------------


def write_recipe(tmp: Path, model_dir: Path, output_dir: Path, name: str = "recipe.yaml") -> Path:
    from tunesmith.demo.booking import generate

    train_rows, eval_rows = generate(n_train=8, n_eval=4, seed=1)
    write_jsonl(tmp / "train.jsonl", train_rows)
    write_jsonl(tmp / "eval.jsonl", eval_rows)
    recipe = {
        "model": str(model_dir),
        "data": {"train": "train.jsonl", "eval": "eval.jsonl", "max_length": 256},
        "method": {"name": "lora", "r": 4, "alpha": 8},
        "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-3, "logging_steps": 1, "save_steps": 100,
                  "bf16": False, "eval_each_epoch": False},
        "eval": {"scorer": "json_match", "max_new_tokens": 6, "batch_size": 4, "limit": 2},
        "output_dir": str(output_dir),
    }
    path = tmp / name
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir):
    """(recipe path, run folder): trained 2 steps, then lora_B set to random values (a non-trivial adapter)."""
    from tunesmith.training.run import train

    tmp = tmp_path_factory.mktemp("eval-export")
    recipe = write_recipe(tmp, tiny_model_dir, tmp / "run")
    result = train(load_config(recipe), progress=False)
    adapter = result.output_dir / "adapter_model.safetensors"
    weights = load_file(adapter)
    gen = torch.Generator().manual_seed(0)
    for k in weights:
        if "lora_B" in k:
            weights[k] = torch.randn(weights[k].shape, generator=gen) * 0.2
    save_file(weights, adapter, metadata={"format": "pt"})
    return recipe, result.output_dir


@pytest.fixture(scope="module")
def probe_ids(tokenizer):
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Book a table in Paris for 2."}],
                                         tokenize=False, add_generation_prompt=True)
    return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]


def peft_logits(model_dir, adapter_dir, ids):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def plain_logits(model_dir, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_adapter_is_not_trivial(run, tiny_model_dir, probe_ids):
    _, run_dir = run
    diff = (peft_logits(tiny_model_dir, run_dir, probe_ids) - plain_logits(tiny_model_dir, probe_ids)).abs().max()
    assert diff > 1e-2


# --- eval loss and perplexity ---------------------------------------------------------------------


def test_supervised_nll_equals_hand_computation(tiny_recipe, tiny_model_dir, tokenizer):
    from tunesmith.data.assemble import prepare_data
    from tunesmith.evaluation.perplexity import supervised_nll
    from tunesmith.models import load_model

    config = load_config(tiny_recipe)
    examples = prepare_data(config, tokenizer).eval[:3]
    assert len({len(e.input_ids) for e in examples}) > 1  # batching pads something
    model = load_model(str(tiny_model_dir)).eval()

    total, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:  # one at a time, no padding at all
            logits = model(input_ids=torch.tensor([ex.input_ids])).logits[0]
            targets = torch.tensor(ex.labels[1:])
            keep = targets != -100
            total += torch.nn.functional.cross_entropy(logits[:-1][keep], targets[keep], reduction="sum").item()
            count += int(keep.sum())
    expected = total / count

    got = supervised_nll(model, examples, tokenizer.pad_token_id, batch_size=2)
    assert got["eval_tokens"] == count == sum(e.num_supervised for e in examples) - 0
    assert got["eval_loss"] == pytest.approx(expected, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(expected), rel=1e-4)


# --- evaluate -------------------------------------------------------------------------------------

REPORT_KEYS = {"model", "examples", "scorer", "score", "eval_loss", "perplexity", "samples"}


def test_evaluate_run_dir_and_base_recipe(run, monkeypatch):
    from tunesmith.evaluation.run import evaluate

    recipe, run_dir = run
    rows = read_rows(recipe.parent / "eval.jsonl")
    # Scripted answers (tests/oracle.py): right from the fine-tuned model, one guest off from the base.
    script_answers(monkeypatch, rows,
                   lambda model, i, row: right_json(row) if hasattr(model, "peft_config") else wrong_json(row))
    tuned = evaluate(str(run_dir), progress=False)
    assert REPORT_KEYS <= tuned.keys()
    assert tuned["model"] == str(run_dir)
    assert tuned["examples"] == 2  # eval.limit
    assert tuned["scorer"] == "json_match"
    assert tuned["score"] == 1.0
    assert tuned["samples"] == [{"prediction": right_json(r), "reference": r["output"], "score": 1.0} for r in rows[:2]]
    assert tuned["eval_loss"] > 0 and tuned["perplexity"] == pytest.approx(math.exp(tuned["eval_loss"]), rel=1e-3)
    assert all({"prediction", "reference", "score"} <= s.keys() for s in tuned["samples"])

    base = evaluate(str(recipe), base=True, progress=False)
    assert REPORT_KEYS <= base.keys()
    assert base["model"].endswith("(base)")
    assert base["examples"] == 2
    assert base["score"] == 0.0
    # Different models (the adapter is far from zero), same data.
    assert base["eval_loss"] != tuned["eval_loss"]
    assert [s["reference"] for s in base["samples"]] == [s["reference"] for s in tuned["samples"]]

    # A trained recipe (no --base) evaluates its run folder.
    via_recipe = evaluate(str(recipe), limit=1, progress=False)
    assert via_recipe["model"] == str(run_dir) and via_recipe["examples"] == 1 and via_recipe["score"] == 1.0


# Right and wrong answers per scorer, each scored by hand: exact_match forgives surrounding whitespace only;
# contains finds the reference inside the answer (the wrong answer is inside the reference, so swapped arguments
# would score it 1); json_match reads JSON out of a sentence (see right_json).
SCRIPTED = {
    "exact_match": (lambda row: f"  {row['output']}\n", lambda row: row["output"] + "."),
    "contains": (lambda row: f"Sure: {row['output'].upper()} - done", lambda row: row["output"][:-4]),
    "json_match": (right_json, wrong_json),
}


@pytest.mark.parametrize("scorer", sorted(SCRIPTED))
def test_task_score_counts_scripted_answers(run, monkeypatch, scorer):
    """Rows 0 and 2 answered right, 1 and 3 wrong: score 0.5 and each sample holds its own prompt's answer and
    reference; every row right: 1.0."""
    from tunesmith.evaluation.run import evaluate_loaded
    from tunesmith.inference import load_for_inference

    recipe, run_dir = run
    rows = read_rows(recipe.parent / "eval.jsonl")
    right, wrong = SCRIPTED[scorer]
    config = load_config(run_dir / "config.yaml")
    config = config.model_copy(update={"eval": config.eval.model_copy(update={"scorer": scorer, "batch_size": 3})})
    loaded = load_for_inference(str(run_dir))

    asked = script_answers(monkeypatch, rows, lambda model, i, row: right(row) if i % 2 == 0 else wrong(row))
    half = evaluate_loaded(loaded, config, limit=4, progress=False)
    assert asked == [0, 1, 2, 3]
    assert half["score"] == 0.5
    assert half["samples"] == [
        {"prediction": (right if i % 2 == 0 else wrong)(r), "reference": r["output"], "score": float(i % 2 == 0)}
        for i, r in enumerate(rows)
    ]

    script_answers(monkeypatch, rows, lambda model, i, row: right(row))
    assert evaluate_loaded(loaded, config, limit=4, progress=False)["score"] == 1.0


def test_json_match_with_a_reference_that_is_not_json(run, tmp_path, monkeypatch):
    """A data error, reported before any generation time is spent."""
    from tunesmith.evaluation import run as eval_run
    recipe, run_dir = run
    rows = read_rows(recipe.parent / "eval.jsonl")
    write_jsonl(tmp_path / "eval.jsonl", [rows[0], {**rows[1], "output": "Ana, Lima, 2 guests"}])
    config = load_config(run_dir / "config.yaml")
    config = config.model_copy(update={"data": config.data.model_copy(update={"eval": str(tmp_path / "eval.jsonl")})})
    monkeypatch.setattr(eval_run, "generate_answers", lambda *a, **k: pytest.fail("generated before checking the data"))
    with pytest.raises(TunesmithError) as exc:
        eval_run.evaluate_loaded(eval_run.load_for_inference(str(run_dir)), config, progress=False)
    assert str(exc.value) == ("eval.scorer json_match: the reference answer of eval example 2 is not valid JSON "
                              "(Expecting value): 'Ana, Lima, 2 guests'; fix the eval data or set eval.scorer to "
                              "exact_match or contains")


def test_evaluate_untrained_recipe_without_base_fails(tmp_path, tiny_model_dir):
    from tunesmith.evaluation.run import evaluate

    recipe = write_recipe(tmp_path, tiny_model_dir, tmp_path / "never-trained")
    with pytest.raises(TunesmithError) as exc:
        evaluate(str(recipe), progress=False)
    msg = str(exc.value)
    assert "has not been trained yet" in msg
    assert f"tunesmith train {recipe}" in msg
    assert "--base" in msg


# --- generation -----------------------------------------------------------------------------------


def test_generate_batch_left_padding_matches_alone(run, tokenizer):
    from tunesmith.inference import generate_batch, load_for_inference

    _, run_dir = run
    loaded = load_for_inference(str(run_dir))
    short = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    long = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Please extract the booking: Ana Silva, Lima, 3 May 2025, 2 guests. " * 3}],
        tokenize=False, add_generation_prompt=True,
    )
    assert len(tokenizer(long)["input_ids"]) > len(tokenizer(short)["input_ids"]) + 10
    side = tokenizer.padding_side

    alone = generate_batch(loaded.model, loaded.tokenizer, [short], max_new_tokens=8)
    batched = generate_batch(loaded.model, loaded.tokenizer, [long, short], max_new_tokens=8)
    long_alone = generate_batch(loaded.model, loaded.tokenizer, [long], max_new_tokens=8)
    assert alone[0] != ""  # otherwise the comparison proves nothing
    assert batched[1] == alone[0]
    assert batched[0] == long_alone[0]
    assert loaded.tokenizer.padding_side == side  # restored


# --- export ---------------------------------------------------------------------------------------


def test_export_merged_loads_alone_and_matches_adapter(run, tmp_path, tiny_model_dir, tokenizer, probe_ids):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.exporting import export

    _, run_dir = run
    out = export(str(run_dir), str(tmp_path / "merged"), merge=True)
    assert out == tmp_path / "merged"
    assert (out / "config.json").is_file() and (out / "tunesmith_run.yaml").is_file()
    assert not (out / "adapter_config.json").exists()
    assert not list(tmp_path.glob(".merged.partial*"))

    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not hasattr(merged, "peft_config")
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        got = merged(input_ids=probe_ids).logits
    want = peft_logits(tiny_model_dir, run_dir, probe_ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)

    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    eos = merged.generation_config.eos_token_id
    assert im_end in (eos if isinstance(eos, list) else [eos])
    assert merged.generation_config.pad_token_id == tokenizer.pad_token_id

    exported_tok = AutoTokenizer.from_pretrained(out)
    assert exported_tok.chat_template and IM_END in exported_tok.chat_template
    assert exported_tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == \
        tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)


def test_export_refuses_non_empty_out(run, tmp_path):
    from tunesmith.exporting import export

    _, run_dir = run
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(TunesmithError) as exc:
        export(str(run_dir), str(out), merge=True)
    assert str(exc.value) == f"--out '{out}' exists and is not empty; pass --overwrite or choose another folder"
    assert (out / "keep.txt").read_text() == "mine"


def test_export_adapter_only(run, tmp_path, tiny_model_dir, probe_ids):
    from tunesmith.exporting import export

    _, run_dir = run
    out = export(str(run_dir), str(tmp_path / "adapter"), merge=False)
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert not list(out.glob("checkpoint-*"))
    torch.testing.assert_close(
        peft_logits(tiny_model_dir, out, probe_ids), peft_logits(tiny_model_dir, run_dir, probe_ids), atol=0, rtol=0
    )


def test_export_requires_run_folder(tmp_path):
    from tunesmith.exporting import export

    with pytest.raises(TunesmithError, match="is not a trained run folder"):
        export(str(tmp_path), str(tmp_path / "out"))


# --- chat -----------------------------------------------------------------------------------------


def test_chat_session_history_reset_system(run):
    from tunesmith.chat import ChatSession
    from tunesmith.inference import load_for_inference

    _, run_dir = run
    session = ChatSession(load_for_inference(str(run_dir)), max_new_tokens=4)
    pieces = []
    answer = session.reply("hi", on_piece=pieces.append)
    assert isinstance(answer, str)
    assert "".join(pieces).strip() == answer
    assert session.messages() == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": answer}]

    second = session.reply("and again?")
    assert len(session.history) == 4
    assert session.history[2] == {"role": "user", "content": "and again?"}
    assert session.history[3] == {"role": "assistant", "content": second}

    session.reset()
    assert session.history == [] and session.messages() == []

    session.set_system("You extract bookings.")
    assert session.messages() == [{"role": "system", "content": "You extract bookings."}]
    session.reply("hi")
    msgs = session.messages()
    assert msgs[0] == {"role": "system", "content": "You extract bookings."}
    assert [m["role"] for m in msgs] == ["system", "user", "assistant"]
    session.set_system("")
    assert session.messages()[0]["role"] == "user"
