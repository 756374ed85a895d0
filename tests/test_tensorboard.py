"""train.report_to: [tensorboard] logs every scalar through transformers' own integration, read back here with
TensorBoard's own reader; a tracker whose package is missing is refused before the run folder is touched."""
from __future__ import annotations

import copy
import importlib.util
import json

import pytest

from tunesmith.config import load_config
from tunesmith.errors import TunesmithError
from tunesmith.training.run import train

from helpers import fails, invoke

SCALARS = ("loss", "grad_norm", "learning_rate", "tokens_per_second", "tokens_seen", "peak_memory_mib")


def test_every_scalar_reaches_the_tensorboard_event_files(tiny_recipe):
    pytest.importorskip("tensorboard", reason="tensorboard is in the `test` extra: pip install -e '.[test]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    raw = copy.deepcopy(tiny_recipe)
    raw["train"].update({"max_steps": 3, "eval_steps": 2, "report_to": ["tensorboard"]})
    run = train(load_config(raw), progress=False).output_dir
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for key in SCALARS:
        expected = [(r["step"], r[key]) for r in logged if key in r]
        assert len(expected) == 3, key
        got = [(e.step, e.value) for e in events.Scalars(f"train/{key}")]
        assert [s for s, _ in got] == [s for s, _ in expected]
        assert all(v == pytest.approx(x, rel=1e-6) for (_, v), (_, x) in zip(got, expected)), key
    evals = [(r["step"], r["eval_loss"]) for r in logged if "eval_loss" in r]
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in events.Scalars("eval/loss")] == evals
    assert {"train/loss", "eval/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_second"} <= tags


@pytest.mark.parametrize("tracker", ["wandb", "mlflow"])
def test_a_tracker_that_is_not_installed_is_refused_with_the_pip_command(tiny_recipe, tmp_path, tracker):
    if importlib.util.find_spec(tracker) is not None:
        pytest.skip(f"{tracker} is installed here")
    raw = copy.deepcopy(tiny_recipe)
    raw["train"]["report_to"] = [tracker]
    with pytest.raises(TunesmithError, match=f"train.report_to: {tracker} needs the {tracker} package"):
        train(load_config(raw), progress=False)
    assert not (tmp_path / "run").exists()


def test_report_to_refuses_an_unknown_tracker_from_the_cli(tiny_recipe, tmp_path):
    import yaml

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe))
    fails(invoke("train", recipe, "--set", "train.report_to=[comet]"),
          "train.report_to[0] = 'comet' is invalid: must be one of 'tensorboard', 'wandb' or 'mlflow'")
    if importlib.util.find_spec("wandb") is None:
        fails(invoke("train", recipe, "--set", "train.report_to=[wandb]"), "pip install wandb")
    assert not (tmp_path / "run").exists()
