"""The doctor's memory check before step 1: the plan's bill of the longest micro batch against free memory."""
from __future__ import annotations

import json

from tunesmith.config import load_config
from tunesmith.doctor.memory import memory_preflight, run_setup
from tunesmith.planning import compute_bill
from tunesmith.planning.recommend import recommend
from tunesmith.sizes import MiB

LENGTHS = [120, 80, 300, 64, 90]


def _bill(config):
    return compute_bill(config.model, config.method, run_setup(config, LENGTHS, "cpu"))


def test_longest_micro_batch_is_billed_as_one_padding_free_row(tiny_recipe):
    config = load_config(tiny_recipe)  # batch_size 4, padding-free rows
    setup = run_setup(config, LENGTHS, "cpu")
    assert (setup.seq_len, setup.batch, setup.layout) == (300 + 120 + 90 + 80, 1, "padding_free")
    padded = run_setup(load_config(tiny_recipe, ["train.padding_free=false"]), LENGTHS, "cpu")
    assert (padded.seq_len, padded.batch, padded.layout) == (300, 4, "padded")


def test_no_finding_when_the_run_fits(tiny_recipe):
    config = load_config(tiny_recipe)
    assert memory_preflight(config, LENGTHS, available=2 * _bill(config).total) is None


def test_a_run_that_does_not_fit_is_named_with_the_recommenders_fix(tiny_recipe):
    """Eight 2000-token examples per micro batch of the built-in model (billed from its config, no weights) on a
    budget that one example fits: the recommender's setup is the fix."""
    model = "model=smollm2-135m-instruct"
    config = load_config(tiny_recipe, [model, "train.batch_size=8"])
    long = [2000] * 8
    one = compute_bill(config.model, config.method, run_setup(load_config(tiny_recipe, [model, "train.batch_size=1"]),
                                                              long, "cpu"))
    free = int(one.total * 1.5)
    assert not compute_bill(config.model, config.method, run_setup(config, long, "cpu"), budget=free).fits
    finding = memory_preflight(config, long, available=free)
    assert finding is not None and finding.code == "memory_will_not_fit" and not finding.fatal
    chosen = recommend(config.model, free, seq_len=2000, precision="fp32", device="cpu").chosen
    assert chosen is not None and f"is {chosen.label} with {chosen.reason.split(' with ', 1)[-1]}" in finding.remedy
    assert "train.gradient_checkpointing: true" in finding.remedy


def test_nothing_fits_says_so(tiny_recipe):
    finding = memory_preflight(load_config(tiny_recipe), LENGTHS, available=1 * MiB)
    assert "no method of the guide's tree fits" in finding.remedy


def test_training_reports_it_before_step_one_and_goes_on(tiny_recipe, tmp_path, monkeypatch, capsys):
    from tunesmith.training.run import train

    monkeypatch.setattr("tunesmith.doctor.memory.available_memory", lambda device: 1 * MiB)
    config = load_config(tiny_recipe, [f"output_dir={tmp_path / 'run'}", "train.max_steps=1", "data.eval=null"])
    result = train(config, progress=True)
    codes = [f["code"] for f in json.loads((result.output_dir / "doctor.json").read_text())["findings"]]
    assert "memory_will_not_fit" in codes and result.summary["steps"] == 1
    assert "doctor: [warning] the plan bills this run's longest micro batch" in capsys.readouterr().err
