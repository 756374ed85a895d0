"""Preference training on the tiny model: the selective log-prob path against full logits, a whole batch's
loss and gradient against TRL 1.16's DPOTrainer loss on full logits of the same model, the reference
(adapter disabled; precomputed for full fine-tuning) against a separately loaded base, and short real runs."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tunesmith.config import load_config
from tunesmith.data.assemble import prepare_data
from tunesmith.data.masking import IGNORE_INDEX
from tunesmith.methods import prepare_model
from tunesmith.models import load_model
from tunesmith.training.preference import PairCollator, PairDataset, completion_logps
from tunesmith.training.run import build_trainer, use_fast_path

from helpers import invoke, ok, write_jsonl
from test_objectives import trl_dpo_loss


# --- the selective log-prob path ----------------------------------------------------------------------


@pytest.mark.parametrize("chunk_rows", [1, 4, 1024])
def test_completion_logps_equal_full_log_softmax(chunk_rows):
    torch.manual_seed(0)
    hidden = torch.randn(2, 9, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True)
    labels = torch.randint(0, 50, (2, 9))
    labels[:, :3] = IGNORE_INDEX
    labels[0, 5] = IGNORE_INDEX  # a second sequence starts here in the padding-free row
    sequence_index = torch.tensor([[0] * 5 + [1] * 4, [2] * 9])
    sums, counts = completion_logps(hidden, weight, labels, sequence_index, 3, chunk_rows=chunk_rows)
    upstream = torch.tensor([0.7, -1.3, 2.0])
    grad_h, grad_w = torch.autograd.grad((sums * upstream).sum(), (hidden, weight))

    # reference: the full (tokens x vocabulary) log-softmax, gathered and summed per sequence by hand
    logp = torch.log_softmax(hidden @ weight.T, dim=-1)[:, :-1]
    targets, owner = labels[:, 1:], sequence_index[:, 1:]
    per_token = logp.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1) * (targets != IGNORE_INDEX)
    expected = torch.stack([per_token[owner == s].sum() for s in range(3)])
    ref_h, ref_w = torch.autograd.grad((expected * upstream).sum(), (hidden, weight))
    torch.testing.assert_close(sums, expected, atol=1e-5, rtol=1e-5)
    assert counts.tolist() == [2, 3, 6]  # positions 3-4, 6-8 and 3-8
    torch.testing.assert_close(grad_h, ref_h, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_w, ref_w, atol=1e-5, rtol=1e-5)


# --- a batch of the tiny model against TRL ------------------------------------------------------------


PAIRS = [{"prompt": f"What is {i} plus {i}?", "chosen": f"{2 * i}.",
          "rejected": f"Well, let me think about it: maybe {2 * i + 1}, or so."} for i in range(24)]


def preference_recipe(tmp: Path, model_dir: Path, objective: str = "dpo", method: str = "lora", **train) -> dict:
    write_jsonl(tmp / "pairs.jsonl", PAIRS)
    return {
        "model": str(model_dir),
        "data": {"train": str(tmp / "pairs.jsonl"), "eval_split": 0.0, "max_length": 128},
        "method": {"name": method, **({"r": 4, "alpha": 8, "dropout": 0.0} if method == "lora" else {})},
        "train": {"objective": objective, "max_steps": 6, "batch_size": 4, "lr": 5e-3, "logging_steps": 1,
                  "save_steps": 100, "bf16": False, "warmup": 0, **train},
        "output_dir": str(tmp / "run"),
    }


def prepared_run(tmp_path, tiny_model_dir, tokenizer, method="lora", objective="dpo"):
    config = load_config(preference_recipe(tmp_path, tiny_model_dir, objective, method))
    data = prepare_data(config, tokenizer)
    model = load_model(str(tiny_model_dir), dtype=torch.float32)
    model.config.use_cache = False
    prepared = prepare_model(model, config)
    torch.manual_seed(3)
    for name, p in prepared.model.named_parameters():
        if "lora_B" in name:  # a trained-looking adapter: the policy now differs from the reference
            p.data.normal_(0, 0.2)
    return config, data, prepared


def full_logits_logps(model, examples) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's layout: [chosen...; rejected...] right-padded, per-token log-probs from the full logits (TRL's
    selective_log_softmax), zero outside the completion, and the completion mask."""
    from trl.trainer.utils import selective_log_softmax

    seqs = [ex.chosen for ex in examples] + [ex.rejected for ex in examples]
    width = max(len(s.input_ids) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    completion = torch.zeros(len(seqs), width)
    for row, s in enumerate(seqs):
        ids[row, : len(s.input_ids)] = torch.tensor(s.input_ids)
        mask[row, : len(s.input_ids)] = 1
        completion[row, : len(s.labels)] = torch.tensor([float(label != IGNORE_INDEX) for label in s.labels])
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    per_token = selective_log_softmax(logits[:, :-1], ids[:, 1:]) * completion[:, 1:]
    return per_token, completion[:, 1:]


def test_dpo_batch_loss_and_gradient_equal_trl_on_full_logits(tmp_path, tiny_model_dir, tokenizer):
    config, data, prepared = prepared_run(tmp_path, tiny_model_dir, tokenizer)
    examples = data.train[:3]
    lora = {n: p for n, p in prepared.model.named_parameters() if p.requires_grad}

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)  # a separate reference copy
    with torch.no_grad():
        ref_tokens, _ = full_logits_logps(base, examples)
    ref = ref_tokens.sum(1).view(2, -1).T  # (pairs, [chosen, rejected])
    per_token, completion = full_logits_logps(prepared.model, examples)
    expected = trl_dpo_loss(per_token, completion, ref, beta=0.1, loss_type="sigmoid")
    expected_grads = torch.autograd.grad(expected, list(lora.values()))

    trainer = build_trainer(config, prepared, tmp_path / "run", data.train)
    undo = use_fast_path(prepared, config)  # fused LoRA, packed attention: what training runs
    batch = PairCollator()([PairDataset(examples)[i] for i in range(len(examples))])
    assert batch["input_ids"].shape[0] == 1  # all six sequences in one padding-free row
    got = trainer.compute_loss(prepared.model, batch)
    got_grads = torch.autograd.grad(got, list(lora.values()))
    undo()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for name, a, b in zip(lora, got_grads, expected_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)
    assert expected.item() != pytest.approx(0.6931, abs=1e-3)  # the policy differs from the reference


def test_adapter_disabled_reference_equals_a_separately_loaded_base(tmp_path, tiny_model_dir, tokenizer):
    config, data, prepared = prepared_run(tmp_path, tiny_model_dir, tokenizer)
    trainer = build_trainer(config, prepared, tmp_path / "run", data.train)
    assert trainer.reference == "adapter"
    examples = data.train[:4]
    batch = PairCollator()([PairDataset(examples)[i] for i in range(len(examples))])
    got = trainer.reference_logps(prepared.model, batch)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    with torch.no_grad():
        base_tokens, _ = full_logits_logps(base, examples)
        policy_tokens, _ = full_logits_logps(prepared.model, examples)
    torch.testing.assert_close(got, base_tokens.sum(1).view(2, -1).T, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, policy_tokens.sum(1).view(2, -1).T, atol=1e-3)


def test_full_fine_tuning_precomputes_the_reference_once(tmp_path, tiny_model_dir, tokenizer):
    config, data, prepared = prepared_run(tmp_path, tiny_model_dir, tokenizer, method="full")
    trainer = build_trainer(config, prepared, tmp_path / "run", data.train)
    assert trainer.reference == "precomputed"
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    with torch.no_grad():
        base_tokens, _ = full_logits_logps(base, data.train)
    stored = torch.tensor([trainer.train_dataset[i]["ref_logps"] for i in range(len(data.train))])
    torch.testing.assert_close(stored, base_tokens.sum(1).view(2, -1).T, atol=1e-4, rtol=1e-5)


# --- short real runs ----------------------------------------------------------------------------------


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_cli_dpo_run_raises_reward_accuracy_and_writes_metrics(tmp_path, tiny_model_dir):
    recipe = preference_recipe(tmp_path, tiny_model_dir)
    recipe_path = tmp_path / "dpo.yaml"
    recipe_path.write_text(json.dumps(recipe))
    inputs = {p: _digest(p) for p in (recipe_path, tmp_path / "pairs.jsonl", tiny_model_dir / "model.safetensors")}
    ok(invoke("train", recipe_path, "--json"))
    rows = [r for r in _metrics(tmp_path / "run") if "loss" in r]
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected"} <= set(rows[0])
    assert rows[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 1 (LoRA B = 0)
    assert rows[-1]["rewards/accuracies"] > rows[0]["rewards/accuracies"]
    assert rows[-1]["rewards/margins"] > rows[0]["rewards/margins"] and rows[-1]["loss"] < rows[0]["loss"]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["objective"] == "dpo" and (tmp_path / "run" / "adapter_model.safetensors").exists()
    assert inputs == {p: _digest(p) for p in inputs}


@pytest.mark.parametrize(("objective", "method"), [("dpo", "full"), ("orpo", "lora"), ("simpo", "lora")])
def test_objectives_train_from_yaml(tmp_path, tiny_model_dir, objective, method):
    from tunesmith.training.run import train

    lr = 1e-3 if method == "full" else 5e-3
    result = train(load_config(preference_recipe(tmp_path, tiny_model_dir, objective, method, lr=lr)), progress=False)
    rows = [r for r in _metrics(result.output_dir) if "loss" in r]
    assert rows[-1]["rewards/margins"] > rows[0]["rewards/margins"]
    assert rows[-1]["rewards/accuracies"] >= rows[0]["rewards/accuracies"]
    if objective == "orpo":
        assert {"nll_loss", "log_odds_ratio", "log_odds_chosen"} <= set(rows[0])


def test_gradient_accumulation_gives_the_gradient_of_the_whole_batch(tmp_path, tiny_model_dir, tokenizer):
    """Each micro batch's loss is its pairs' mean, and the Trainer divides it by the accumulation steps: two
    micro batches of 2 pairs make the gradient of one batch of 4."""
    config, data, prepared = prepared_run(tmp_path, tiny_model_dir, tokenizer)
    lora = [p for p in prepared.model.parameters() if p.requires_grad]
    items = PairDataset(data.train[:4])
    collate = PairCollator()

    def gradient(accumulation: int, batches: list[list[int]]) -> list[torch.Tensor]:
        config.train.grad_accum = accumulation
        trainer = build_trainer(config, prepared, tmp_path / "run", data.train)
        trainer.current_gradient_accumulation_steps = accumulation
        for p in lora:
            p.grad = None
        for indices in batches:
            trainer.training_step(prepared.model, collate([items[i] for i in indices]))
        return [p.grad.clone() for p in lora]

    whole = gradient(1, [[0, 1, 2, 3]])
    accumulated = gradient(2, [[0, 1], [2, 3]])
    for a, b in zip(accumulated, whole):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    assert any(g.abs().sum() > 0 for g in whole)
