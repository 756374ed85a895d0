"""The run config: defaults, YAML recipes, --set overrides, and the exact text of every error a user can hit."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from tunesmith.config import RunConfig, config_to_yaml, load_config
from tunesmith.errors import TunesmithError

MINIMAL = {"data": {"train": "x.jsonl"}}


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# --- defaults -------------------------------------------------------------------------------------


def test_defaults_load_from_minimal_dict():
    config = load_config({"data": {"train": "x.jsonl"}})
    assert isinstance(config, RunConfig)
    assert config.model == "smollm2-135m-instruct"
    assert config.trust_remote_code is False
    assert config.output_dir == "runs/run"

    assert config.data.train == "x.jsonl"
    assert config.data.eval is None
    assert config.data.eval_split == 0.1
    assert config.data.format == "auto"
    assert config.data.chat_template is None
    assert config.data.system_prompt is None
    assert config.data.max_length == 1024
    assert config.data.truncation == "drop"
    assert config.data.train_on == "all_assistant"
    assert config.data.split == "train"

    assert config.method.name == "lora"
    assert config.method.r == 16
    assert config.method.alpha == 32.0
    assert config.method.dropout == 0.05
    assert config.method.target_modules == "all-linear"

    assert config.train.epochs == 1.0
    assert config.train.max_steps == -1
    assert config.train.batch_size == 8
    assert config.train.grad_accum == 1
    assert config.train.lr == 2e-4
    assert config.train.scheduler == "cosine"
    assert config.train.warmup == 0.03
    assert config.train.bf16 == "auto"
    assert config.train.seed == 42

    assert config.eval.scorer == "exact_match"
    assert config.eval.max_new_tokens == 128
    assert config.eval.limit is None


def test_dict_source_is_not_mutated_by_overrides():
    source = {"data": {"train": "x.jsonl"}}
    load_config(source, ["model=other"])
    assert source == {"data": {"train": "x.jsonl"}}


def test_nested_set_does_not_change_the_callers_dict():
    source = {"data": {"train": "x.jsonl"}, "train": {"lr": 0.1}}
    config = load_config(source, ["data.max_length=64", "train.lr=0.5"])
    assert config.data.max_length == 64 and config.train.lr == 0.5
    assert source == {"data": {"train": "x.jsonl"}, "train": {"lr": 0.1}}


def test_list_of_train_files_is_accepted():
    config = load_config({"data": {"train": ["a.jsonl", "b.jsonl"]}})
    assert config.data.train == ["a.jsonl", "b.jsonl"]


# --- YAML recipes ---------------------------------------------------------------------------------


def test_yaml_recipe_resolves_relative_data_paths_against_the_recipe_folder(tmp_path, monkeypatch):
    recipe_dir = tmp_path / "recipes"
    write(recipe_dir / "data" / "train.jsonl", "{}\n")
    write(recipe_dir / "data" / "eval.jsonl", "{}\n")
    write(recipe_dir / "chat.jinja", "{{ messages }}")
    recipe = write(
        recipe_dir / "run.yaml",
        "model: smollm2-135m-instruct\n"
        "data:\n"
        "  train: data/train.jsonl\n"
        "  eval: data/eval.jsonl\n"
        "  chat_template: chat.jinja\n"
        "train:\n"
        "  lr: 3.0e-4\n"
        "  epochs: 2\n",
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    config = load_config(str(recipe))
    assert Path(config.data.train) == recipe_dir / "data" / "train.jsonl"
    assert Path(config.data.eval) == recipe_dir / "data" / "eval.jsonl"
    assert Path(config.data.chat_template) == recipe_dir / "chat.jinja"
    assert config.train.lr == 3e-4
    assert config.train.epochs == 2.0


def test_yaml_recipe_resolves_each_path_of_a_list(tmp_path, monkeypatch):
    recipe_dir = tmp_path / "recipes"
    write(recipe_dir / "a.jsonl", "{}\n")
    write(recipe_dir / "b.jsonl", "{}\n")
    recipe = write(recipe_dir / "run.yaml", "data:\n  train: [a.jsonl, b.jsonl, org/hub-dataset]\n")
    monkeypatch.chdir(tmp_path)

    config = load_config(recipe)  # a Path works as well as a str
    assert config.data.train == [str(recipe_dir / "a.jsonl"), str(recipe_dir / "b.jsonl"), "org/hub-dataset"]


def test_yaml_recipe_keeps_paths_that_exist_in_the_working_dir(tmp_path, monkeypatch):
    recipe_dir = tmp_path / "recipes"
    write(recipe_dir / "train.jsonl", "{}\n")
    write(tmp_path / "train.jsonl", "{}\n")
    recipe = write(recipe_dir / "run.yaml", "data:\n  train: train.jsonl\n")
    monkeypatch.chdir(tmp_path)
    assert load_config(recipe).data.train == "train.jsonl"


def test_yaml_recipe_keeps_hub_ids_and_missing_paths_unchanged(tmp_path, monkeypatch):
    recipe = write(tmp_path / "run.yaml", "data:\n  train: some-org/some-dataset\n  eval: missing.jsonl\n")
    monkeypatch.chdir(tmp_path)
    config = load_config(recipe)
    assert config.data.train == "some-org/some-dataset"
    assert config.data.eval == "missing.jsonl"


def test_inline_chat_template_is_not_treated_as_a_path(tmp_path):
    recipe = write(
        tmp_path / "run.yaml",
        "data:\n  train: x.jsonl\n  chat_template: \"{% for m in messages %}{{ m.content }}{% endfor %}\"\n",
    )
    config = load_config(recipe)
    assert config.data.chat_template == "{% for m in messages %}{{ m.content }}{% endfor %}"


def test_scientific_notation_in_yaml_is_a_float(tmp_path):
    # PyYAML (YAML 1.1) reads a bare `1e-4` as the string "1e-4".
    recipe = write(tmp_path / "run.yaml", "data:\n  train: x.jsonl\ntrain:\n  lr: 1e-4\n  weight_decay: 1E-2\n")
    config = load_config(recipe)
    assert isinstance(config.train.lr, float)
    assert config.train.lr == pytest.approx(1e-4)
    assert config.train.weight_decay == pytest.approx(1e-2)


def test_empty_yaml_file_means_defaults_and_then_needs_data(tmp_path):
    recipe = write(tmp_path / "empty.yaml", "")
    with pytest.raises(TunesmithError, match=r"data\.train is required"):
        load_config(recipe)
    config = load_config(recipe, ["data.train=x.jsonl"])
    assert config.data.train == "x.jsonl"


# --- --set overrides ------------------------------------------------------------------------------


def test_set_overrides_apply_on_top_of_the_recipe(tmp_path):
    recipe = write(tmp_path / "run.yaml", "data:\n  train: x.jsonl\ntrain:\n  lr: 3.0e-4\n  batch_size: 4\n")
    config = load_config(str(recipe), ["train.lr=1e-4", "method.target_modules=[q_proj,v_proj]"])
    assert config.train.lr == pytest.approx(1e-4)
    assert isinstance(config.train.lr, float)
    assert config.method.target_modules == ["q_proj", "v_proj"]
    assert config.train.batch_size == 4  # untouched keys keep the recipe's value


def test_set_values_are_parsed_as_yaml():
    config = load_config(
        MINIMAL,
        [
            "train.batch_size=2",
            "train.gradient_checkpointing=true",
            "train.bf16=false",
            "data.system_prompt=You are terse.",
            "model=my-org/my-model",
            "eval.limit=5",
            "data.format = alpaca",
        ],
    )
    assert config.train.batch_size == 2
    assert config.train.gradient_checkpointing is True
    assert config.train.bf16 is False
    assert config.data.system_prompt == "You are terse."
    assert config.model == "my-org/my-model"
    assert config.eval.limit == 5
    assert config.data.format == "alpaca"


def test_set_value_may_contain_an_equals_sign():
    config = load_config(MINIMAL, ["data.system_prompt=a=b"])
    assert config.data.system_prompt == "a=b"


def test_set_creates_missing_sections():
    config = load_config(None, ["data.train=x.jsonl", "train.epochs=3"])
    assert config.data.train == "x.jsonl"
    assert config.train.epochs == 3.0


def test_later_set_wins():
    config = load_config(MINIMAL, ["train.lr=1e-3", "train.lr=5e-5"])
    assert config.train.lr == pytest.approx(5e-5)


# --- error messages -------------------------------------------------------------------------------


def test_unknown_nested_key_suggests_nearest_valid_name():
    with pytest.raises(TunesmithError, match=re.escape("config: unknown key 'data.max_len'; did you mean 'data.max_length'?")):
        load_config({"data": {"train": "x.jsonl", "max_len": 512}})


def test_unknown_key_in_a_recipe_names_the_file(tmp_path):
    recipe = write(tmp_path / "run.yaml", "data:\n  train: x.jsonl\ntrain:\n  learning_rate: 1e-4\n")
    with pytest.raises(TunesmithError) as info:
        load_config(recipe)
    assert str(info.value).startswith(f"{recipe}: unknown key 'train.learning_rate'")


def test_unknown_top_level_key_with_suggestion():
    with pytest.raises(TunesmithError, match=re.escape("unknown key 'modle'; did you mean 'model'?")):
        load_config({"data": {"train": "x.jsonl"}, "modle": "x"})


def test_unknown_top_level_key_without_close_match():
    with pytest.raises(TunesmithError) as info:
        load_config({"data": {"train": "x.jsonl"}, "zzzqqq": 1})
    assert str(info.value) == "config: unknown key 'zzzqqq'"


def test_unknown_key_via_set_is_reported():
    with pytest.raises(TunesmithError, match=re.escape("unknown key 'train.epoch'; did you mean 'train.epochs'?")):
        load_config(MINIMAL, ["train.epoch=2"])


def test_bad_value_type_names_key_path_and_value():
    with pytest.raises(TunesmithError) as info:
        load_config({"data": {"train": "x.jsonl", "max_length": "long"}})
    msg = str(info.value)
    assert "data.max_length = 'long' is invalid" in msg
    assert "valid integer" in msg


def test_bad_value_via_set_names_key_path_and_value():
    with pytest.raises(TunesmithError, match=re.escape("train.batch_size = 'many' is invalid")):
        load_config(MINIMAL, ["train.batch_size=many"])


def test_out_of_range_value_is_reported():
    with pytest.raises(TunesmithError, match=re.escape("train.lr = 0 is invalid: Input should be greater than 0")):
        load_config({"data": {"train": "x.jsonl"}, "train": {"lr": 0}})


def test_section_given_as_a_value_is_reported():
    with pytest.raises(TunesmithError, match=re.escape("config: train = 'abc' is invalid")):
        load_config({"data": {"train": "x.jsonl"}, "train": "abc"})


def test_mapping_where_a_value_belongs_names_the_key():
    with pytest.raises(TunesmithError) as info:
        load_config({"data": {"train": "x.jsonl"}, "model": {"name": "x"}})
    assert str(info.value) == "config: model = {'name': 'x'} is invalid: Input should be a valid string"


def test_fractional_warmup_steps_are_rejected():
    with pytest.raises(TunesmithError, match=r"train\.warmup = 2\.5 is invalid: .*must be whole"):
        load_config({"data": {"train": "x.jsonl"}, "train": {"warmup": 2.5}})


def test_bad_literal_lists_valid_choices():
    with pytest.raises(TunesmithError) as info:
        load_config({"data": {"train": "x.jsonl", "format": "csvish"}})
    assert str(info.value) == (
        "config: data.format = 'csvish' is invalid: "
        "must be one of 'auto', 'alpaca', 'sharegpt', 'messages' or 'prompt_completion'"
    )


def test_bad_scheduler_lists_valid_choices():
    with pytest.raises(TunesmithError, match=re.escape("'cosine', 'linear', 'constant' or 'constant_with_warmup'")):
        load_config(MINIMAL, ["train.scheduler=cosin"])


def test_bad_value_of_union_field_names_the_real_key_path():
    with pytest.raises(TunesmithError) as info:
        load_config({"data": {"train": "x.jsonl"}, "train": {"bf16": "maybe"}})
    msg = str(info.value)
    assert "train.bf16 = 'maybe' is invalid" in msg
    assert "literal[" not in msg


def test_missing_train_data():
    with pytest.raises(TunesmithError) as info:
        load_config({})
    assert str(info.value) == (
        "config: data.train is required: a data file (.jsonl/.json/.csv/.parquet) or a hub dataset id"
    )


def test_missing_train_data_without_any_source():
    with pytest.raises(TunesmithError, match=r"data\.train is required"):
        load_config()


def test_invalid_yaml(tmp_path):
    recipe = write(tmp_path / "bad.yaml", "data:\n  train: [unclosed\n")
    with pytest.raises(TunesmithError, match=re.escape(f"{recipe}: not valid YAML")):
        load_config(recipe)


def test_invalid_yaml_is_one_line_that_says_where(tmp_path):
    recipe = write(tmp_path / "bad.yaml", "data:\n  train: [unclosed\n")
    with pytest.raises(TunesmithError) as info:
        load_config(recipe)
    # the `[` is the 10th character of line 2; the file ends at line 3, column 1
    assert str(info.value) == (
        f"{recipe}: not valid YAML: expected ',' or ']', but got '<stream end>' at line 3, column 1 "
        "(while parsing a flow sequence started at line 2, column 10)"
    )


def test_recipe_that_is_not_utf8_is_reported(tmp_path):
    recipe = tmp_path / "latin1.yaml"
    recipe.write_bytes("model: caf\u00e9\n".encode("latin-1"))  # é is byte 10 (0-based), invalid alone in UTF-8
    with pytest.raises(TunesmithError) as info:
        load_config(recipe)
    assert str(info.value) == (f"{recipe}: line 1, column 11: byte 0xe9 is not UTF-8 text (Latin-1 or Windows-1252?); "
                               "save the file as UTF-8")


def test_yaml_top_level_must_be_a_mapping(tmp_path):
    recipe = write(tmp_path / "list.yaml", "- a\n- b\n")
    with pytest.raises(TunesmithError) as info:
        load_config(recipe)
    assert str(info.value) == (
        f"{recipe}: the top level must be a mapping of keys (model, data, method, train, ...)"
    )


def test_yaml_scalar_top_level_is_rejected(tmp_path):
    recipe = write(tmp_path / "scalar.yaml", "just a string\n")
    with pytest.raises(TunesmithError, match="the top level must be a mapping"):
        load_config(recipe)


def test_missing_recipe_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(TunesmithError) as info:
        load_config(str(missing))
    assert str(info.value) == f"recipe '{missing}' does not exist"


def test_recipe_that_is_a_folder_is_reported_as_a_folder(tmp_path):
    with pytest.raises(TunesmithError, match="is a folder; pass the recipe file"):
        load_config(tmp_path)


def test_malformed_set_without_equals():
    with pytest.raises(TunesmithError) as info:
        load_config(MINIMAL, ["train.lr"])
    assert str(info.value) == "--set 'train.lr': expected KEY=VALUE, e.g. --set train.lr=1e-4"


def test_malformed_set_with_empty_key():
    with pytest.raises(TunesmithError) as info:
        load_config(MINIMAL, ["=3"])
    assert str(info.value) == "--set '=3': the key is empty"


def test_set_into_a_value_is_rejected():
    with pytest.raises(TunesmithError) as info:
        load_config({"data": {"train": "x.jsonl"}, "model": "m"}, ["model.name=x"])
    assert str(info.value) == "--set model.name=x: 'model' is a value, not a section"


# --- config_to_yaml -------------------------------------------------------------------------------


def test_config_to_yaml_round_trips_defaults(tmp_path):
    config = load_config(MINIMAL)
    recipe = write(tmp_path / "config.yaml", config_to_yaml(config))
    assert load_config(recipe) == config


def test_config_to_yaml_round_trips_non_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(
        {
            "model": "some-org/some-model",
            "trust_remote_code": True,
            "data": {
                "train": ["a.jsonl", "b.jsonl"],
                "eval": "e.jsonl",
                "format": "sharegpt",
                "system_prompt": "Be brief: answer in one line.\nNo chit-chat.",
                "max_length": 256,
                "truncation": "truncate",
                "train_on": "last_assistant",
            },
            "method": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
            "train": {"lr": 1e-5, "warmup": 10, "bf16": False, "max_steps": 50, "scheduler": "linear"},
            "eval": {"scorer": "json_match", "limit": 20},
            "output_dir": "runs/custom",
        }
    )
    text = config_to_yaml(config)
    recipe = write(tmp_path / "sub" / "config.yaml", text)
    again = load_config(recipe)
    assert again == config
    assert again.train.lr == pytest.approx(1e-5)
    assert again.method.target_modules == ["q_proj", "v_proj"]


def test_text_field_that_looks_like_a_number_is_kept_as_text(tmp_path):
    config = load_config({"data": {"train": "x.jsonl", "system_prompt": "1e5"}})
    assert config.data.system_prompt == "1e5"
