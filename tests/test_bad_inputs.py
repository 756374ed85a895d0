"""Every bad input ends in exit 1 and one line on stderr naming the file/key/line and the fix (issue 13, part 2).

Each case builds its bad input under its own tmp folder next to a good recipe, data file and (where it
needs one) a copy of the tiny model; the files there are hashed before and after the command, so a
failing command is also shown to leave the user's files as they were.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml

from helpers import fails, invoke, write_jsonl

CASES = []


def case(fn):
    """Register a case: fn(ws) returns (argv, *fragments the one error line must hold)."""
    CASES.append(pytest.param(fn, id=fn.__name__))
    return fn


class Workspace:
    """A tmp folder holding a good recipe (tiny model, good data), and helpers to break one piece of it."""

    def __init__(self, root: Path, model_dir: Path, rows: list[dict]):
        self.root, self.model_dir = root, model_dir
        self.data = write_jsonl(root / "train.jsonl", rows)
        self.recipe_dict = {"model": str(model_dir), "data": {"train": "train.jsonl", "max_length": 128},
                            "method": {"name": "lora", "r": 4, "alpha": 8},
                            "train": {"max_steps": 1, "batch_size": 2, "bf16": False}, "output_dir": "run"}

    def recipe(self, name: str = "recipe.yaml", **changes) -> Path:
        raw = json.loads(json.dumps(self.recipe_dict))
        for dotted, value in changes.items():
            *parents, last = dotted.split("__")
            node = raw
            for key in parents:
                node = node.setdefault(key, {})
            node[last] = value
        path = self.root / name
        path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
        return path

    def text(self, name: str, text: str) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return path

    def raw(self, name: str, data: bytes) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    def model_copy(self, name: str = "model") -> Path:
        return Path(shutil.copytree(self.model_dir, self.root / name))

    def run_dir(self, name: str = "run-done") -> Path:
        """A folder laid out like a finished LoRA run (config + adapter files), without training one."""
        run = self.root / name
        run.mkdir()
        cfg = dict(self.recipe_dict, data={"train": str(self.data), "max_length": 128}, output_dir=str(run))
        (run / "config.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
        for f in self.model_dir.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
                shutil.copy(f, run / f.name)
        return run


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def ws(tmp_path, tiny_model_dir, booking_rows, monkeypatch) -> Workspace:
    monkeypatch.chdir(tmp_path)
    return Workspace(tmp_path, tiny_model_dir, booking_rows[0][:6])


@pytest.mark.parametrize("build", CASES)
def test_bad_input_is_one_clear_line(build, ws):
    argv, *fragments = build(ws)
    before = _hashes(ws.root)
    message = fails(invoke(*argv), *fragments)
    assert not message.startswith("error: unexpected "), "a bad input reached the last-resort crash handler"
    after = _hashes(ws.root)
    assert {k: after.get(k) for k in before} == before, "a failed command changed the user's files"


def test_the_table_is_large_enough():
    assert len(CASES) >= 60


# ---- the recipe file ---------------------------------------------------------------------------------------
@case
def recipe_missing(ws):
    return ["config", "show", "nope.yaml"], "recipe 'nope.yaml' does not exist"


@case
def recipe_is_a_folder(ws):
    (ws.root / "recipes").mkdir()
    return ["config", "show", "recipes"], "'recipes' is a folder", "recipe file"


@case
def recipe_not_utf8(ws):
    path = ws.raw("r.yaml", b"model: x\ndata:\n  train: caf\xe9.jsonl\n")
    return ["config", "show", path], str(path), "line 3", "UTF-8"


@case
def recipe_tab_indent(ws):
    path = ws.text("r.yaml", "data:\n\ttrain: train.jsonl\n")
    return ["config", "show", path], str(path), "line 2, column 1", "tab"


@case
def recipe_unclosed_bracket(ws):
    path = ws.text("r.yaml", "data:\n  train: train.jsonl\nmethod:\n  target_modules: [q_proj, v_proj\n")
    return ["config", "show", path], str(path), "line 4"


@case
def recipe_misindented_key(ws):
    path = ws.text("r.yaml", "data:\n    train: train.jsonl\n  max_length: 64\n")
    return ["config", "show", path], str(path), "line 3, column 3"


@case
def recipe_is_jsonl(ws):
    return ["config", "show", ws.data], str(ws.data), "line 2", "looks like a data file"


@case
def recipe_top_level_list(ws):
    path = ws.text("r.yaml", "- model: x\n")
    return ["config", "show", path], str(path), "top level must be a mapping"


@case
def recipe_duplicate_top_key(ws):
    path = ws.text("r.yaml", "data:\n  train: train.jsonl\nmodel: a\nmodel: b\n")
    return ["config", "show", path], str(path), "duplicate key 'model'", "line 4", "also at line 3"


@case
def recipe_duplicate_nested_key(ws):
    path = ws.text("r.yaml", "data:\n  train: train.jsonl\ntrain:\n  lr: 1e-4\n  epochs: 2\n  lr: 2e-4\n")
    return ["config", "show", path], str(path), "duplicate key 'lr'", "line 6"


# ---- keys users bring from transformers / TRL ----------------------------------------------------------------
def _alias_case(key: str, value, expected: str, section: str | None = None):
    def build(ws):
        changes = {f"{section}__{key}" if section else key: value}
        path = ws.recipe(**changes)
        return ["config", "show", path], f"unknown key '{section + '.' if section else ''}{key}'", expected
    build.__name__ = f"hf_name_{section + '_' if section else ''}{key}"
    return case(build)


for _key, _value, _expected, _section in [
    ("learning_rate", 1e-4, "train.lr", None),
    ("learning_rate", 1e-4, "train.lr", "train"),
    ("per_device_train_batch_size", 4, "train.batch_size", None),
    ("per_device_train_batch_size", 4, "train.batch_size", "train"),
    ("num_train_epochs", 3, "train.epochs", None),
    ("num_train_epochs", 3, "train.epochs", "train"),
    ("gradient_accumulation_steps", 4, "train.grad_accum", "train"),
    ("lora_r", 8, "method.r", None),
    ("lora_r", 8, "method.r", "method"),
    ("lora_alpha", 16, "method.alpha", "method"),
    ("lora_dropout", 0.1, "method.dropout", None),
    ("max_seq_length", 512, "data.max_length", None),
    ("max_seq_length", 512, "data.max_length", "train"),
    ("model_name_or_path", "x", "model", None),
    ("warmup_ratio", 0.1, "train.warmup", "train"),
    ("weight_decay", 0.1, "train.weight_decay", None),
]:
    _alias_case(_key, _value, _expected, _section)


# ---- values and options that do not apply ------------------------------------------------------------------
@case
def rank_with_full(ws):
    path = ws.recipe(method={"name": "full", "r": 8})
    return ["config", "show", path], "method.r cannot be used with method.name=full", "remove it"


@case
def rank_zero(ws):
    return ["config", "show", ws.recipe(method__r=0)], "method.r = 0 is invalid", "greater than or equal to 1"


@case
def dropout_one(ws):
    return ["config", "show", ws.recipe(method__dropout=1.5)], "method.dropout = 1.5 is invalid"


@case
def negative_num_threads(ws):
    return ["config", "show", ws.recipe(train__num_threads=-1)], "train.num_threads = -1 is invalid", "greater than or equal to 0"


@case
def unknown_method(ws):
    return ["config", "show", ws.recipe(method__name="lorax")], "method.name = 'lorax' is invalid", "'lora'"


@case
def no_train_data(ws):
    path = ws.text("r.yaml", "model: x\n")
    return ["config", "show", path], "data.train is required"


@case
def lr_not_a_number(ws):
    return ["config", "show", ws.recipe(train__lr="fast")], "train.lr = 'fast' is invalid"


@case
def set_bad_value_blames_set(ws):
    return ["config", "show", ws.recipe(), "--set", "train.lr=fast"], "--set train.lr=fast", "train.lr"


@case
def set_without_equals(ws):
    return ["config", "show", ws.recipe(), "--set", "train.lr"], "--set 'train.lr': expected KEY=VALUE"


@case
def set_into_a_value(ws):
    return ["config", "show", ws.recipe(), "--set", "train.lr.x=1"], "--set train.lr.x=1", "train.lr"


@case
def set_unknown_key(ws):
    return ["config", "show", ws.recipe(), "--set", "train.learning_rate=1e-4"], "--set train.learning_rate", "train.lr"


# ---- data --------------------------------------------------------------------------------------------------
@case
def data_missing(ws):
    path = ws.recipe(data__train="nope.jsonl")
    return ["data", "stats", path], "nope.jsonl", "does not exist"


@case
def data_is_a_folder(ws):
    (ws.root / "shards").mkdir()
    path = ws.recipe(data__train="shards")
    return ["data", "stats", path], "shards", "is a folder"


@case
def data_line_not_utf8(ws):
    ws.raw("bad.jsonl", ws.data.read_bytes() + b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n')
    path = ws.recipe(data__train="bad.jsonl")
    return ["data", "stats", path], "bad.jsonl:7", "UTF-8"


@case
def data_line_not_json(ws):
    ws.text("bad.jsonl", ws.data.read_text() + "{not json\n")
    path = ws.recipe(data__train="bad.jsonl")
    return ["data", "stats", path], "bad.jsonl:7", "not valid JSON"


@case
def data_line_not_object(ws):
    ws.text("bad.jsonl", "[1, 2]\n")
    return ["data", "stats", ws.recipe(data__train="bad.jsonl")], "bad.jsonl:1", "JSON object"


@case
def data_empty(ws):
    ws.text("empty.jsonl", "")
    return ["data", "stats", ws.recipe(data__train="empty.jsonl")], "empty.jsonl", "no rows"


@case
def assistant_content_null(ws):
    write_jsonl(ws.root / "bad.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                      {"role": "assistant", "content": None}]}])
    return ["data", "stats", ws.recipe(data__train="bad.jsonl")], "bad.jsonl:1", "content"


@case
def messages_not_a_list(ws):
    write_jsonl(ws.root / "bad.jsonl", [{"messages": "hi"}])
    return ["data", "stats", ws.recipe(data__train="bad.jsonl")], "bad.jsonl:1", "'messages' must be a list"


@case
def unknown_row_shape(ws):
    write_jsonl(ws.root / "bad.jsonl", [{"foo": "bar"}])
    return ["data", "stats", ws.recipe(data__train="bad.jsonl")], "bad.jsonl:1"


@case
def no_assistant_message(ws):
    write_jsonl(ws.root / "bad.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    return ["data", "stats", ws.recipe(data__train="bad.jsonl")], "bad.jsonl:1", "no assistant message"


@case
def chat_template_syntax_error(ws):
    path = ws.recipe(data__chat_template="{% for m in messages %}\n{{ m.content }\n{% endfor %}")
    return ["data", "stats", path], "data.chat_template", "template", "line 2"


@case
def chat_template_file_missing(ws):
    return ["data", "stats", ws.recipe(data__chat_template="tmpl.jinja")], "tmpl.jinja"


# ---- models ------------------------------------------------------------------------------------------------
@case
def model_unknown_name(ws):
    return ["data", "stats", ws.recipe(model="not-a-model")], "not-a-model"


@case
def model_relative_to_recipe_missing(ws):
    sub = ws.root / "proj"
    sub.mkdir()
    ws.recipe("proj/recipe.yaml", model="./weights", data__train=str(ws.data))
    return ["data", "stats", "proj/recipe.yaml"], "weights", str(sub / "weights")


@case
def model_config_not_json(ws):
    model = ws.model_copy()
    (model / "config.json").write_text("{ not json", encoding="utf-8")
    return ["data", "stats", ws.recipe(model=str(model))], "config.json", "not valid JSON"


@case
def model_without_tokenizer(ws):
    model = ws.model_copy()
    for f in model.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            f.unlink()
    return ["data", "stats", ws.recipe(model=str(model))], str(model), "tokenizer"


@case
def model_random_gguf(ws):
    path = ws.raw("model.gguf", b"\x00\x01 this is not a gguf file" * 10)
    return ["data", "stats", ws.recipe(model=str(path))], "model.gguf", "is not a GGUF file"


@case
def model_truncated_safetensors(ws):
    model = ws.model_copy()
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    return ["chat", model, "--base", "--prompt", "hi"], "model.safetensors", "truncated"


# ---- train options -----------------------------------------------------------------------------------------
@case
def resume_with_overwrite(ws):
    return ["train", ws.recipe(), "--resume", "--overwrite"], "--resume", "--overwrite"


@case
def max_steps_zero(ws):
    return ["train", ws.recipe(), "--max-steps", "0"], "--max-steps"


@case
def max_steps_negative(ws):
    return ["train", ws.recipe(), "--max-steps", "-3"], "--max-steps"


@case
def resume_without_checkpoint(ws):
    return ["train", ws.recipe(), "--resume"], "--resume: no checkpoint"


@case
def target_modules_match_nothing(ws):
    path = ws.recipe(method__target_modules=["q_prj"])
    return ["train", path], "q_prj", "q_proj"


@case
def output_dir_is_the_recipe_folder(ws):
    return ["train", ws.recipe(), "--output-dir", ".", "--overwrite"], "output"


# ---- eval / chat / export ----------------------------------------------------------------------------------
@case
def eval_missing_path(ws):
    return ["eval", "no-such-run"], "no-such-run"


@case
def chat_missing_path(ws):
    return ["chat", "no-such-run", "--prompt", "hi"], "no-such-run"


@case
def eval_negative_limit(ws):
    return ["eval", ws.recipe(), "--limit", "-1"], "--limit"


@case
def chat_negative_temperature(ws):
    return ["chat", ws.recipe(), "--prompt", "hi", "--temperature", "-1"], "--temperature"


@case
def chat_zero_new_tokens(ws):
    return ["chat", ws.recipe(), "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens"


@case
def run_missing_adapter(ws):
    run = ws.run_dir()
    return ["eval", run], str(run), "adapter"


@case
def run_truncated_adapter(ws):
    run = ws.run_dir()
    (run / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                          "target_modules": ["q_proj"], "task_type": "CAUSAL_LM",
                                                          "base_model_name_or_path": str(ws.model_dir)}))
    (run / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\"")
    return ["chat", run, "--prompt", "hi"], "adapter_model.safetensors"


@case
def export_not_a_run(ws):
    return ["export", ws.root, "--out", ws.root / "exported"], "is not a trained run folder"


@case
def export_missing_run(ws):
    return ["export", "no-such-run", "--out", "exported"], "no-such-run"


# ---- merge specs -------------------------------------------------------------------------------------------
def _spec(ws, **spec) -> Path:
    base = {"method": "linear", "models": [{"model": str(ws.model_dir), "weight": 0.5},
                                           {"model": str(ws.model_dir), "weight": 0.5}]}
    base.update(spec)
    return ws.text("spec.yaml", yaml.safe_dump(base))


@case
def merge_bad_method(ws):
    return ["merge", _spec(ws, method="average"), "--out", "merged"], "method = 'average' is invalid"


@case
def merge_no_models(ws):
    return ["merge", _spec(ws, models=[]), "--out", "merged"], "models"


@case
def merge_model_missing(ws):
    spec = _spec(ws, models=[{"model": "nope-dir", "weight": 0.5}, {"model": str(ws.model_dir), "weight": 0.5}])
    return ["merge", spec, "--out", "merged"], "nope-dir"


@case
def merge_density_out_of_range(ws):
    spec = _spec(ws, method="ties", base_model=str(ws.model_dir), density=1.5)
    return ["merge", spec, "--out", "merged"], "density = 1.5 is invalid"


@case
def merge_unknown_key(ws):
    return ["merge", _spec(ws, weights=[1, 2]), "--out", "merged"], "unknown key 'weights'"


@case
def merge_spec_missing(ws):
    return ["merge", "nope.yaml", "--out", "merged"], "nope.yaml", "does not exist"


@case
def merge_spec_duplicate_key(ws):
    spec = ws.text("spec.yaml", f"method: linear\nmethod: ties\nmodels: [{ws.model_dir}, {ws.model_dir}]\n")
    return ["merge", spec, "--out", "merged"], "duplicate key 'method'", "line 2"


# ---- plan --------------------------------------------------------------------------------------------------
@case
def plan_unknown_model(ws):
    return ["plan", "--model", "not-a-model"], "not-a-model"


@case
def plan_bad_budget(ws):
    return ["plan", "--budget", "lots"], "lots"


@case
def plan_unknown_method(ws):
    return ["plan", "--method", "lorax"], "lorax"
