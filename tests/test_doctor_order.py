"""The doctor's order check before step 1: length-grouped order with padding-free rows saves nothing."""
from __future__ import annotations

import json

from tunesmith.config import load_config
from tunesmith.doctor.order import length_grouped_order


def test_only_length_grouping_over_padding_free_rows_is_named(tiny_recipe):
    grouped = load_config(tiny_recipe, ["train.order=group_by_length"])
    finding = length_grouped_order(grouped)
    assert finding.code == "length_grouped_order" and "train.order: random" in finding.remedy
    assert length_grouped_order(load_config(tiny_recipe)) is None  # the default order is random
    assert load_config(tiny_recipe).train.order == "random"
    assert length_grouped_order(load_config(tiny_recipe, ["train.order=group_by_length",
                                                          "train.padding_free=false"])) is None
    assert length_grouped_order(load_config(tiny_recipe, ["train.order=sequential"])) is None


def test_training_reports_it_before_step_one_and_goes_on(tiny_recipe, tmp_path, capsys):
    from tunesmith.training.run import train

    config = load_config(tiny_recipe, [f"output_dir={tmp_path / 'run'}", "train.max_steps=1", "data.eval=null",
                                       "train.order=group_by_length"])
    result = train(config, progress=True)
    codes = [f["code"] for f in json.loads((result.output_dir / "doctor.json").read_text())["findings"]]
    assert codes == ["length_grouped_order"] and result.summary["steps"] == 1
    assert "doctor: [warning] train.order: group_by_length saves no padding" in capsys.readouterr().err
