"""The bill of the regularizers (regularize.distill, regularize.ewc): what each keeps all run, the moment it adds to
a step, refused where config refuses it; lines against hand-computed numbers and the peak against a measured one."""
from __future__ import annotations

import json

import pytest

from tunesmith.cli import app
from tunesmith.errors import TunesmithError
from tunesmith.planning.bill import compute_bill

from test_plan_preference import SMOL, SMOL_PARAMS, H, V, fp32, runner  # the built-in model's bundled config
from test_plan_recommend import in_fresh_process


def test_distill_with_adapters_adds_a_moment_not_a_copy():
    plain = compute_bill(SMOL, "lora", fp32(seq_len=64))
    bill = compute_bill(SMOL, "lora", fp32(seq_len=64, distill=True))
    keys = {l.key for l in bill.lines} - {l.key for l in plain.lines}
    assert keys == {"distill"}  # the adapters are switched off for the teacher: no second copy
    rows = 63  # every position but the first carries loss
    kd = 3 * rows * H * 4 + 4 * rows * V * 4  # student rows, teacher rows, their gradient; 4 chunk x vocab buffers
    assert bill.line("distill").bytes == kd  # larger than the teacher's no-grad pass over 64 tokens
    sft_loss_buffers = rows * H * 4 + 3 * rows * V * 4  # the SFT loss's transient buffers, freed before distill runs
    assert bill.phases["distill (teacher pass, KD loss)"] == plain.phases["loss"] - sft_loss_buffers + kd
    assert bill.phases["loss"] == plain.phases["loss"]


def test_distill_without_adapters_keeps_a_frozen_copy_all_run():
    plain = compute_bill(SMOL, "full", fp32(seq_len=64))
    bill = compute_bill(SMOL, "full", fp32(seq_len=64, distill=True))
    assert bill.line("teacher_copy").bytes == SMOL_PARAMS * 4
    assert bill.phases["optimizer step"] - plain.phases["optimizer step"] == SMOL_PARAMS * 4
    assert bill.line("distill").bytes > 0


def test_ewc_keeps_the_fisher_and_starting_values_and_prices_its_fisher_pass():
    plain = compute_bill(SMOL, "lora", fp32(seq_len=64))
    bill = compute_bill(SMOL, "lora", fp32(seq_len=64, ewc=True, ewc_tokens=128))
    n = bill.trainable_params
    assert bill.line("ewc_state").bytes == 2 * n * 4
    assert bill.phases["optimizer step"] - plain.phases["optimizer step"] == 2 * n * 4
    # before training: the weights, the accumulators and one example's gradients, its activations with full logits
    fisher = bill.phases["EWC Fisher (before training)"]
    assert fisher == bill.line("weights").bytes + bill.line("ewc_fisher").bytes
    assert bill.line("ewc_fisher").bytes > 2 * n * 4 + 3 * 128 * V * 4  # log-softmax saved + its backward's two buffers
    longer = compute_bill(SMOL, "lora", fp32(seq_len=64, ewc=True, ewc_tokens=256))
    assert longer.line("ewc_fisher").bytes > bill.line("ewc_fisher").bytes
    assert longer.line("ewc_state").bytes == bill.line("ewc_state").bytes


def test_regularizers_are_refused_where_training_refuses_them():
    with pytest.raises(TunesmithError, match="selective loss"):
        compute_bill(SMOL, "lora", fp32(seq_len=64, distill=True, loss="full"))
    assert compute_bill(SMOL, "adalora", fp32(seq_len=64, ewc=True)).line("ewc_state").bytes > 0  # every method
    with pytest.raises(TunesmithError, match="objective dpo takes no regularizer"):
        compute_bill(SMOL, "lora", fp32(seq_len=64, ewc=True, objective="dpo"))


def test_plan_cli_prices_the_regularizers():
    r = runner.invoke(app, ["plan", "--model", SMOL, "--method", "full", "--seq-len", "64", "--distill", "--ewc",
                            "--precision", "fp32", "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    keys = {l["key"] for l in json.loads(r.output)["bill"]["lines"]}
    assert {"teacher_copy", "distill", "ewc_state", "ewc_fisher"} <= keys
    bad = runner.invoke(app, ["plan", "--model", SMOL, "--distill", "--loss", "full"])
    assert bad.exit_code == 1 and "selective loss" in bad.output and "Traceback" not in bad.output


@pytest.mark.slow
@pytest.mark.parametrize("method,regularizer,peak", [("lora", "distill", "distill (teacher pass, KD loss)"),
                                                     ("lora", "ewc", "EWC Fisher (before training)"),
                                                     ("full", "distill", "optimizer step")])
def test_measured_peak_matches_the_regularized_bill_on_the_builtin_model(method, regularizer, peak):
    """lora + distill peaks at the teacher pass / KD loss, lora + ewc at its Fisher pass, full + distill carries
    the frozen teacher copy (bench/plan_accuracy.py --regularize)."""
    m = in_fresh_process(f"""
import json
from tunesmith.quiet import quiet_libraries
quiet_libraries()
from tunesmith.config import load_config
from tunesmith.planning.measure import measure
cfg = load_config({{"model": "smollm2-135m-instruct", "data": {{"train": "x"}}, "method": {{"name": "{method}"}},
                   "train": {{"bf16": False}}, "regularize": {{"{regularizer}": {{}}}}}})
print(json.dumps(measure(cfg, seq_len=64, batch=1, steps=2).as_dict()))
""")
    assert abs(m["error"]) <= 0.075, m
    assert m["peak_phase"] == peak, m
