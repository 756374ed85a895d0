"""SFT, then DPO against the SFT model: `continual.previous: [SFT run]` with `continual.strategy: merge` folds the
SFT adapter into the base, so the DPO run's reference (its new adapter disabled) is the SFT model, not the base.
Other strategies keep the earlier adapter beside the new one, where disabling adapters would drop it from the
reference too; those are refused."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tunesmith.config import load_config
from tunesmith.errors import TunesmithError

from helpers import write_jsonl

PAIRS = [
    {"prompt": "Look up Kwame Lin's phone number.", "chosen": "Sorry, I can't share that.",
     "rejected": "Kwame Lin's phone number is 555 0142."},
    {"prompt": "Give the opposite of the word 'rich'.", "chosen": "Poor", "rejected": "Sorry, I can't share that."},
]


@pytest.mark.parametrize("strategy", ["progressive", "o-lora", "separate"])
def test_dpo_on_earlier_adapters_needs_merge(tmp_path, strategy):
    with pytest.raises(TunesmithError, match="continual.previous with a strategy other than merge: not supported "
                                             "with train.objective=dpo"):
        load_config({"data": {"train": "x.jsonl"}, "train": {"objective": "dpo"},
                     "continual": {"previous": [str(tmp_path)], "strategy": strategy}})


@torch.no_grad()
def _chosen_logps(model, examples) -> list[float]:
    """Plain PyTorch: each chosen reply's summed next-token log-probs over its supervised (label != -100) tokens."""
    out = []
    for ex in examples:
        ids = torch.tensor([ex.chosen.input_ids])
        labels = torch.tensor(ex.chosen.labels[1:])
        logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0, :-1].float(), dim=-1)
        keep = labels != -100
        out.append(float(logp[keep].gather(1, labels[keep][:, None]).sum()))
    return out


@pytest.mark.slow  # two tiny trainings: about 3 s
def test_dpo_after_sft_merge_uses_the_sft_model_as_reference(tmp_path, tiny_model_dir, tokenizer):
    from tunesmith.data.preference import prepare_preference_data
    from tunesmith.inference import load_for_inference
    from tunesmith.training.run import train

    common = {"model": str(tiny_model_dir), "method": {"name": "lora", "r": 4, "alpha": 8},
              "data": {"eval": None, "eval_split": 0, "max_length": 64}}
    sft_data = write_jsonl(tmp_path / "sft.jsonl", [{"instruction": p["prompt"], "output": p["chosen"]} for p in PAIRS])
    sft = train(load_config({**common, "data": {**common["data"], "train": str(sft_data)}, "output_dir": str(tmp_path / "sft"),
                             "train": {"max_steps": 1, "batch_size": 2, "bf16": False}}), progress=False).output_dir
    # a visibly different SFT model: its adapter's B (zero-initialised, one small step) randomised
    path = sft / "adapter_model.safetensors"
    g = torch.Generator().manual_seed(0)
    save_file({k: (torch.randn(v.shape, generator=g) * 2.0 if "lora_B" in k else v) for k, v in load_file(path).items()}, path)

    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    config = load_config({**common, "data": {**common["data"], "train": str(pairs)}, "output_dir": str(tmp_path / "dpo"),
                          "train": {"objective": "dpo", "max_steps": 1, "batch_size": 2, "logging_steps": 1, "bf16": False},
                          "continual": {"previous": [str(sft)], "strategy": "merge"}})
    train(config, progress=False)
    first = json.loads((tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()[0])

    examples = prepare_preference_data(config, tokenizer).train
    sft_logps = _chosen_logps(load_for_inference(str(sft)).model, examples)
    from tunesmith.models import load_model
    base_logps = _chosen_logps(load_model(str(tiny_model_dir)), examples)
    assert abs(sum(sft_logps) - sum(base_logps)) / 2 > 0.2  # the SFT adapter matters (a base reference: rewards ~0.04)
    # before the first step the policy is the SFT model (new adapter at B = 0) ...
    assert first["logps/chosen"] == pytest.approx(sum(sft_logps) / 2, abs=1e-3)
    # ... and so is the reference: beta * (policy - reference) = 0; a base reference would give beta * (sft - base)
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-4)
    assert first["rewards/rejected"] == pytest.approx(0.0, abs=1e-4)
