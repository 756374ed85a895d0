"""The bill of a preference run (dpo, orpo, simpo): a pair is two sequences in one padding-free row, only their
completion positions reach the lm_head, and dpo adds a reference pass (adapter disabled, or precomputed for
methods that train the weights, with a frozen copy priced beside it). Lines against hand-computed numbers, the
reference choice against what training/preference.py really chooses, and the peak against a measured one."""
from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from tunesmith.cli import app
from tunesmith.config import load_config
from tunesmith.errors import TunesmithError
from tunesmith.methods import METHODS, load_kwargs, prepare_model
from tunesmith.models import load_model
from tunesmith.planning import plan
from tunesmith.planning.bill import compute_bill
from tunesmith.planning.setup import Setup
from tunesmith.training.preference import reference_mode

from helpers import write_jsonl
from test_plan_recommend import in_fresh_process

SMOL = "smollm2-135m"  # bundled config of the built-in model: hidden 576, 30 layers, vocabulary 49152
SMOL_PARAMS = 134_515_008
H, V = 576, 49152
runner = CliRunner()


def fp32(**kw) -> Setup:
    return Setup(precision="fp32", device="cpu", **kw)


def test_a_pair_is_two_sequences_in_one_row():
    """dpo with 2 pairs of 256-token sequences saves what sft saves for 4 sequences of 256 (one padding-free
    row of 1024 tokens, attention per sequence)."""
    pairs = compute_bill(SMOL, "lora", fp32(seq_len=256, batch=2, objective="simpo"))
    sequences = compute_bill(SMOL, "lora", fp32(seq_len=256, batch=4))
    assert pairs.line("activations").bytes == sequences.line("activations").bytes
    assert pairs.line("activations").bytes > compute_bill(SMOL, "lora", fp32(seq_len=256, batch=2)).line("activations").bytes


def test_completion_log_probs_by_hand():
    """Only completion positions reach the lm_head: 2 pairs x 2 sequences x 255 targets at half supervised.
    Forward keeps their hidden states (4 B each) and int64 targets; backward adds their gradient and, per chunk,
    the logits and the softmax turned into its gradient (2 x C x V fp32); full fine-tuning (tied lm_head) adds
    the fp32 weight gradient and one chunk's product."""
    rows = int(2 * 2 * 255 * 0.5)
    lora = compute_bill(SMOL, "lora", fp32(seq_len=256, batch=2, objective="dpo", supervised_share=0.5))
    assert lora.line("logits").bytes == rows * (H * 4 + 8) + rows * H * 4 + 2 * rows * V * 4
    full = compute_bill(SMOL, "full", fp32(seq_len=256, batch=2, objective="dpo", supervised_share=0.5))
    assert full.line("logits").bytes == rows * (H * 4 + 8) + rows * H * 4 + 2 * rows * V * 4 + 2 * V * H * 4


def test_dpo_reference_of_an_adapter_is_the_base_with_no_second_copy():
    dpo = compute_bill(SMOL, "lora", fp32(seq_len=128, objective="dpo"))
    sft = compute_bill(SMOL, "lora", fp32(seq_len=128, batch=2))
    ref = dpo.line("reference")
    assert "adapter disabled" in ref.label and ref.phases == ("reference",)
    assert dpo.line("weights").bytes == sft.line("weights").bytes  # no extra weights
    # the reference runs first in the step: only the state alive between steps is under it
    base = sum(dpo.line(k).bytes for k in ("weights", "optimizer", "master"))
    assert dpo.phases["reference forward"] == base + ref.bytes
    assert dpo.peak_phase == "loss"


def test_full_fine_tuning_prices_a_frozen_copy_and_precomputes():
    dpo = compute_bill(SMOL, "full", fp32(seq_len=128, objective="dpo"))
    ref = dpo.line("reference")
    assert "precomputed" in ref.label
    copy_mib = SMOL_PARAMS * 4 / 2**20  # 134,515,008 fp32 weights
    assert f"{copy_mib:.1f} MiB" in ref.formula and "frozen copy" in ref.formula
    assert any("frozen copy" in n and f"{copy_mib:.1f} MiB" in n for n in dpo.notes)
    # before training: the model as loaded, no gradients or optimizer states
    assert dpo.phases["reference pass (before training)"] == SMOL_PARAMS * 4 + ref.bytes
    sft = compute_bill(SMOL, "full", fp32(seq_len=128, batch=2))
    assert dpo.line("weights").bytes == sft.line("weights").bytes


@pytest.mark.parametrize("objective", ["orpo", "simpo"])
def test_objectives_without_a_reference_price_none(objective):
    bill = compute_bill(SMOL, "full", fp32(seq_len=128, objective=objective))
    with pytest.raises(KeyError):
        bill.line("reference")
    assert not any("reference" in phase for phase in bill.phases)


@pytest.mark.parametrize("method", list(METHODS))
def test_the_bills_reference_is_the_one_training_chooses(method, tmp_path, tiny_model_dir):
    """The bill's reference line names what training/preference.reference_mode picks for the prepared model."""
    small = {"r": 4, "alpha": 8, "init_r": 6, "target_r": 4}
    section = {"name": method, **{k: v for k, v in small.items() if k in METHODS[method].options}}
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}])
    config = load_config({"model": str(tiny_model_dir), "data": {"train": str(tmp_path / "p.jsonl")},
                          "method": section, "train": {"objective": "dpo", "bf16": False}})
    prepared = prepare_model(load_model(str(tiny_model_dir), **load_kwargs(config)), config)
    trains = reference_mode(config, prepared)
    bill = compute_bill(str(tiny_model_dir), config.method, fp32(seq_len=32, objective="dpo"))
    assert bill.line("reference").label == {"adapter": "reference model (adapter disabled)",
                                            "precomputed": "reference model (precomputed)"}[trains]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"objective": "kto"}, "objective 'kto': use one of sft, dpo, orpo, simpo"),
    ({"objective": "dpo", "loss": "full"}, "objective dpo scores completions with the chunked log-probs"),
    ({"objective": "simpo", "model": "gemma-2-2b"}, "soft-caps its logits: plan it with objective sft"),
])
def test_bad_preference_plans_are_one_line_errors(kwargs, message):
    kwargs = {"model": SMOL, "method": "lora", **kwargs}
    with pytest.raises(TunesmithError) as err:
        plan(kwargs.pop("model"), kwargs.pop("method"), seq_len=64, **kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_cli_plan_objective():
    r = runner.invoke(app, ["plan", "--model", SMOL, "--method", "full", "--objective", "dpo", "--seq-len", "64",
                            "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    bill = json.loads(r.output)["bill"]
    assert bill["setup"]["objective"] == "dpo"
    assert "reference pass (before training)" in bill["phases"]
    bad = runner.invoke(app, ["plan", "--model", SMOL, "--objective", "ipo"])
    assert bad.exit_code == 1 and "objective 'ipo': use one of" in bad.output and "Traceback" not in bad.output


def test_measure_runs_the_preference_trainer(tiny_model_dir, tmp_path):
    """`plan --measure --objective dpo` steps the trainer train builds (pairs, the adapter-disabled reference),
    on synthetic pairs of seq_len tokens each."""
    from tunesmith.planning.measure import measure

    config = load_config({"model": str(tiny_model_dir), "data": {"train": "(synthetic)"},
                          "method": {"name": "lora", "r": 4, "alpha": 8},
                          "train": {"objective": "dpo", "bf16": False}})
    m = measure(config, seq_len=16, batch=2, steps=1, live_memory=False)
    assert m.bill.setup["objective"] == "dpo" and m.bill.line("reference").label.endswith("(adapter disabled)")
    assert m.measured > 0 and m.tokens_per_second > 0
    assert m.tokens_per_second == pytest.approx(2 * 2 * 16 / m.seconds_per_step)  # 2 pairs of 2 sequences


# ---- measured ------------------------------------------------------------------------------------
MEASURE = """
import json
from tunesmith.quiet import quiet_libraries
quiet_libraries()
from tunesmith.config import load_config
from tunesmith.planning.measure import measure
cfg = load_config({{"model": "smollm2-135m-instruct", "data": {{"train": "x"}}, "method": {{"name": "{method}"}},
                   "train": {{"bf16": False, "objective": "{objective}"}}}})
print(json.dumps(measure(cfg, seq_len=64, batch=1, steps=2).as_dict()))
"""


@pytest.mark.slow
@pytest.mark.parametrize(("method", "objective"), [("lora", "dpo"), ("full", "dpo")])
def test_measured_peak_matches_the_preference_bill_on_the_builtin_model(method, objective):
    m = in_fresh_process(MEASURE.format(method=method, objective=objective))
    assert m["measured_bytes"] > 0 and m["seconds_per_step"] > 0
    assert abs(m["error"]) <= 0.075, m  # the same bound as the SFT bill (bench/plan_accuracy.py)


@pytest.mark.slow
def test_train_dry_run_of_a_dpo_recipe(tiny_model_dir, tmp_path):
    write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"What is {i} plus {i}?", "chosen": f"{2 * i}.",
                                            "rejected": f"Maybe {2 * i + 1}, I think."} for i in range(16)])
    recipe = {"model": str(tiny_model_dir), "data": {"train": str(tmp_path / "pairs.jsonl"), "eval_split": 0.0},
              "method": {"name": "lora", "r": 4, "alpha": 8},
              "train": {"objective": "dpo", "batch_size": 2, "bf16": False}, "output_dir": str(tmp_path / "run")}
    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump(recipe))
    d = in_fresh_process(f"""
import json
from typer.testing import CliRunner
from tunesmith.cli import app
r = CliRunner().invoke(app, ["train", {str(path)!r}, "--dry-run", "--json"])
assert r.exit_code == 0, r.output
print(json.dumps(json.loads(r.output)))
""")
    assert d["bill"]["setup"]["objective"] == "dpo" and "reference forward" in d["bill"]["phases"]
    assert d["measurement"]["measured_bytes"] > 0
    # No accuracy bound here: a 64-wide model's DPO step peaks at ~50 MiB, mostly fixed process overhead the bill
    # does not model (measured 15-32% above it, varying with the allocator and the machine's load); the bill's
    # 7.5% bound is tested on the built-in model (test_measured_peak_matches_the_preference_bill_on_the_builtin_model).
    assert d["measurement"]["predicted_bytes"] > 0
    assert not (tmp_path / "run").exists()
