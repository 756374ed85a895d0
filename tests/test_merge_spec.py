"""The merge spec: defaults per method, and an error message for every bad input."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tunesmith.errors import TunesmithError
from tunesmith.merging.spec import load_merge_spec, spec_to_yaml


def err(spec, overrides=None) -> str:
    with pytest.raises(TunesmithError) as info:
        load_merge_spec(spec, overrides)
    return str(info.value)


def test_defaults_per_method_and_model_shorthand():
    s = load_merge_spec({"method": "ties", "base_model": "b", "models": ["m1", {"model": "m2", "weight": 0.5, "density": 0.2}]})
    assert [e.model for e in s.models] == ["m1", "m2"]
    assert s.weights() == [1.0, 0.5] and s.densities() == [0.5, 0.2]
    assert s.effective_normalize is True and s.effective_lambda == 1.0
    assert load_merge_spec({"method": "task_arithmetic", "base_model": "b", "models": ["m"]}).effective_normalize is False
    assert load_merge_spec({"method": "dare_linear", "base_model": "b", "models": ["m"]}).effective_rescale == "inverse_density"
    assert load_merge_spec({"method": "linear", "models": ["a", "b"]}).effective_normalize is True
    assert load_merge_spec({"method": "slerp", "models": ["a", "b"]}).effective_t == 0.5
    s = load_merge_spec({"method": "ties", "base_model": "b", "models": ["m"], "density": 0.3, "lambda": 0.7})
    assert s.densities() == [0.3] and s.effective_lambda == 0.7


def test_base_listed_among_models_is_skipped_for_task_vector_methods():
    s = load_merge_spec({"method": "ties", "base_model": "b", "models": ["b", "m1", "m2"]})
    assert [e.model for e in s.merged_models()] == ["m1", "m2"]
    s = load_merge_spec({"method": "linear", "base_model": "b", "models": ["b", "m1"]})
    assert [e.model for e in s.merged_models()] == ["b", "m1"]


def test_resolved_spec_fills_defaults_and_round_trips():
    s = load_merge_spec({"method": "dare_ties", "base_model": "b", "models": ["m1", "m2"], "seed": 3})
    text = spec_to_yaml(s)
    back = yaml.safe_load(text)
    assert back["models"][0] == {"model": "m1", "weight": 1.0, "density": 0.5}
    assert back["lambda"] == 1.0 and back["rescale"] == "inverse_density" and back["seed"] == 3 and back["normalize"] is True
    assert load_merge_spec(back).resolved() == s.resolved()


def test_slerp_needs_exactly_two_models():
    msg = err({"method": "slerp", "models": ["a", "b", "c"], "t": 0.3})
    assert "exactly two models, got 3" in msg and "the first is t=0" in msg
    assert "exactly two models, got 1" in err({"method": "slerp", "base_model": "a", "models": ["b"]})


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_linear", "dare_ties"])
def test_task_vector_methods_need_a_base(method):
    msg = err({"method": method, "models": ["a", "b"]})
    assert "needs base_model" in msg and "model - base" in msg


def test_weights_summing_to_zero_with_normalize():
    msg = err({"method": "linear", "models": [{"model": "a", "weight": 1}, {"model": "b", "weight": -1}]})
    assert "sum to zero" in msg and "normalize: false" in msg
    load_merge_spec({"method": "linear", "normalize": False, "models": [{"model": "a", "weight": 1}, {"model": "b", "weight": -1}]})
    # task arithmetic does not normalise by default, so subtracting a skill is fine
    load_merge_spec({"method": "task_arithmetic", "base_model": "x", "models": [{"model": "a", "weight": 1}, {"model": "b", "weight": -1}]})
    assert "sum to zero" in err({"method": "task_arithmetic", "base_model": "x", "normalize": True,
                                 "models": [{"model": "a", "weight": 1}, {"model": "b", "weight": -1}]})


@pytest.mark.parametrize("extra,key,users", [
    ({"t": 0.3}, "t", "slerp"),
    ({"lambda": 0.5}, "lambda", "task_arithmetic"),
    ({"density": 0.5}, "density", "ties"),
    ({"rescale": "norm"}, "rescale", "dare_linear"),
])
def test_parameters_of_other_methods_are_refused(extra, key, users):
    msg = err({"method": "linear", "models": ["a", "b"], **extra})
    assert f"`{key}` is not a linear parameter" in msg and users in msg and "remove it" in msg


def test_per_model_parameters_of_other_methods_are_refused():
    assert "`models[1].density` is not a linear parameter" in err({"method": "linear", "models": ["a", {"model": "b", "density": 0.5}]})
    assert "`models[0].weight` is not a slerp parameter" in err({"method": "slerp", "models": [{"model": "a", "weight": 2}, "b"]})


def test_value_errors_name_the_key_and_the_fix():
    assert "t = 1.5 is invalid" in err({"method": "slerp", "models": ["a", "b"], "t": 1.5})
    assert "t = [0.2, -0.1] is invalid" in err({"method": "slerp", "models": ["a", "b"], "t": [0.2, -0.1]})
    assert "models[0].density = 1.5 is invalid" in err({"method": "ties", "base_model": "x", "models": [{"model": "a", "density": 1.5}]})
    msg = err({"method": "avg", "models": ["a"]})
    assert "method = 'avg' is invalid: must be one of" in msg and "'ties'" in msg
    assert "models is required" in err({"method": "linear"})
    assert "max_shard_size = 'lots' is invalid" in err({"method": "linear", "models": ["a"], "max_shard_size": "lots"})
    assert "dtype = 'int8' is invalid" in err({"method": "linear", "models": ["a"], "dtype": "int8"})


def test_unknown_keys_get_the_nearest_name_or_a_hint():
    assert "unknown key 'merge_method'; did you mean 'method'?" in err({"method": "linear", "merge_method": "x", "models": ["a"]})
    assert "unknown key 'modles'; did you mean 'models'?" in err({"method": "linear", "modles": ["a"], "models": ["a"]})
    msg = err({"method": "ties", "base_model": "x", "models": [{"model": "a", "parameters": {"weight": 1}}]})
    assert "unknown key 'models[0].parameters'" in msg and "weight/density directly on each model" in msg
    assert "unknown key 'models[0].wieght'; did you mean 'models.weight'?" in err({"method": "linear", "models": [{"model": "a", "wieght": 1}]})


def test_yaml_file_errors(tmp_path):
    assert "does not exist" in err(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: [linear\n")
    assert err(bad) == (f"{bad}: not valid YAML: expected ',' or ']', but got '<stream end>' at line 2, column 1 "
                        "(while parsing a flow sequence started at line 1, column 9)")
    bad.write_text("- a\n- b\n")
    assert "top level must be a mapping" in err(bad)


def test_overrides_reach_nested_and_list_keys():
    raw = {"method": "ties", "base_model": "b", "models": ["m1", {"model": "m2"}]}
    s = load_merge_spec(raw, ["lambda=0.8", "models.0.weight=0.25", "models.1.density=0.1", "seed=5"])
    assert s.effective_lambda == 0.8 and s.weights() == [0.25, 1.0] and s.densities() == [0.5, 0.1] and s.seed == 5
    s = load_merge_spec({"method": "slerp", "models": ["a", "b"]}, ["t=[0, 0.5, 1]"])
    assert s.t == [0, 0.5, 1]
    assert "not an index" in err(raw, ["models.5.weight=1"])
    assert "expected KEY=VALUE" in err(raw, ["lambda"])


def test_overrides_do_not_change_the_callers_dict():
    raw = {"method": "ties", "base_model": "b", "models": ["m1", {"model": "m2"}]}
    s = load_merge_spec(raw, ["models.0.weight=0.25", "models.1.density=0.1"])
    assert s.weights() == [0.25, 1.0] and s.densities() == [0.5, 0.1]
    assert raw == {"method": "ties", "base_model": "b", "models": ["m1", {"model": "m2"}]}


def test_override_through_a_plain_value_is_refused():
    raw = {"method": "ties", "base_model": "b", "models": ["m1"], "density": 0.5}
    assert err(raw, ["density.x=1"]) == "--set density.x=1: 'density' is a value, not a section"


def test_relative_model_paths_resolve_against_the_spec_folder(tmp_path, monkeypatch):
    (tmp_path / "specs" / "runs" / "a").mkdir(parents=True)
    spec = tmp_path / "specs" / "merge.yaml"
    spec.write_text(yaml.safe_dump({"method": "ties", "base_model": "smollm2-135m-instruct",
                                    "models": ["runs/a", "elsewhere/b"]}))
    monkeypatch.chdir(tmp_path)
    s = load_merge_spec(spec)
    assert Path(s.models[0].model) == tmp_path / "specs" / "runs" / "a"
    assert s.models[1].model == "elsewhere/b"  # found nowhere: left as written (the error comes when merging)
    assert s.base_model == "smollm2-135m-instruct"


def test_one_valid_recipe_per_method():
    from tunesmith.merging.spec import METHODS

    recipes = Path(__file__).resolve().parent.parent / "recipes"
    for method in METHODS:
        spec = load_merge_spec(recipes / f"merge-{method}.yaml")
        assert spec.method == method
        assert len(spec.models) == 2 and spec.base_model == "smollm2-135m-instruct"
