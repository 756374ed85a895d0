"""DPO, ORPO and SimPO with every adapter method (LoRA, DoRA, QLoRA, VeRA, LoRA+, IA3, AdaLoRA) and the whole-model
ones (full, freeze, GaLore): the reference is the adapter-disabled base (its log-probs equal those of a separately
loaded base, 4-bit where the method's base is), and a few optimizer steps on one batch lower the loss with
gradients reaching every trainable tensor. AdaLoRA's orthogonality term rides on the preference loss as a method
loss term (methods/adalora_orthogonality.py). QLoRA's reference pass is a no-grad CPU
forward, the one that makes bitsandbytes repack its weights on AVX512-BF16 CPUs (tests/test_qlora.py): the
`avx512bf16` fixture checks it stays off here too."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tunesmith.config import load_config
from tunesmith.data.assemble import prepare_data
from tunesmith.methods import METHODS, load_kwargs, prepare_model
from tunesmith.models import load_model
from tunesmith.training.preference import PairCollator, PairDataset
from tunesmith.training.run import build_trainer, use_fast_path

from test_preference_train import full_logits_logps, preference_recipe
from test_qlora import avx512bf16, repacking  # noqa: F401  (a fixture, used by name)

ADAPTERS = [name for name, entry in METHODS.items() if entry.saves_adapter]
WHOLE_MODEL = [name for name, entry in METHODS.items() if not entry.saves_adapter]
# Small adapters on the tiny model (hidden 64): each method's own rank option, every other default.
SMALL = {"r": 4, "alpha": 8, "init_r": 6, "target_r": 4}


def method_section(name: str) -> dict:
    entry = METHODS[name]
    return {"name": name, **{k: v for k, v in SMALL.items() if k in entry.options},
            **({"dropout": 0.0} if "dropout" in entry.options else {})}


def prepared_run(tmp_path, model_dir, tokenizer, method: str, objective: str = "dpo", **train):
    recipe = preference_recipe(tmp_path, model_dir, objective, "lora", **train)
    recipe["method"] = method_section(method)
    config = load_config(recipe)
    data = prepare_data(config, tokenizer)
    model = load_model(str(model_dir), **({"dtype": torch.float32} | load_kwargs(config)))
    model.config.use_cache = False
    prepared = prepare_model(model, config)
    return config, data, prepared


def move_away_from_base(model) -> None:
    """A trained-looking adapter: every trainable tensor nudged, so the policy differs from the reference."""
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)


def separate_base(config, model_dir):
    """The base as a second, independent load: 4-bit when the method's base is."""
    return AutoModelForCausalLM.from_pretrained(str(model_dir), **({"dtype": torch.float32} | load_kwargs(config)))


@pytest.mark.parametrize("method", ADAPTERS)
def test_reference_is_the_adapter_disabled_base(tmp_path, tiny_model_dir, tokenizer, method, avx512bf16):
    config, data, prepared = prepared_run(tmp_path, tiny_model_dir, tokenizer, method)
    move_away_from_base(prepared.model)
    trainer = build_trainer(config, prepared, tmp_path / "run", data.train)
    assert trainer.reference == "adapter"
    examples = data.train[:3]
    batch = PairCollator()([PairDataset(examples)[i] for i in range(len(examples))])
    undo = use_fast_path(prepared, config)
    got = trainer.reference_logps(prepared.model, batch)
    undo()
    with torch.no_grad():
        base_tokens, _ = full_logits_logps(separate_base(config, tiny_model_dir), examples)
        policy_tokens, _ = full_logits_logps(prepared.model, examples)
    torch.testing.assert_close(got, base_tokens.sum(1).view(2, -1).T, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got, policy_tokens.sum(1).view(2, -1).T, atol=1e-2)  # the adapter was really off


def steps_on_one_batch(trainer, prepared, batch, n: int) -> list[tuple[float, dict[str, torch.Tensor]]]:
    """n optimizer steps through the Trainer's own training_step and optimizer: (loss, gradients) per step."""
    optimizer = trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1
    trainable = {name: p for name, p in prepared.model.named_parameters() if p.requires_grad}
    out = []
    for _ in range(n):
        optimizer.zero_grad()
        loss = trainer.training_step(prepared.model, batch)
        out.append((float(loss), {name: p.grad.clone() for name, p in trainable.items() if p.grad is not None}))
        optimizer.step()
    return out


@pytest.mark.parametrize("objective", ["dpo", "orpo", "simpo"])
@pytest.mark.parametrize("method", ADAPTERS + WHOLE_MODEL)
def test_preference_steps_lower_the_loss(tmp_path, tiny_model_dir, tokenizer, method, objective, avx512bf16):
    lr = 1e-3 if method in WHOLE_MODEL else 2e-2
    config, data, prepared = prepared_run(tmp_path, tiny_model_dir, tokenizer, method, objective, lr=lr)
    trainer = build_trainer(config, prepared, tmp_path / "run", data.train)
    assert trainer.reference == ({"dpo": "adapter" if method in ADAPTERS else "precomputed"}.get(objective))
    examples = data.train[:4]
    batch = PairCollator()([trainer.train_dataset[i] for i in range(len(examples))])
    method_terms = sum(float(term(prepared.model, {}, None)) for term in prepared.loss_terms)  # AdaLoRA's
    undo = use_fast_path(prepared, config)
    steps = steps_on_one_batch(trainer, prepared, batch, 4)
    undo()
    losses = [loss for loss, _ in steps]
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0], losses
    trainable = {name for name, p in prepared.model.named_parameters() if p.requires_grad}
    last = steps[-1][1]
    assert set(last) == trainable  # gradients reach every trainable tensor
    assert sum(g.abs().sum() for g in last.values()) > 0
    if objective == "dpo":
        # every method starts as the base: policy == reference
        assert losses[0] - method_terms == pytest.approx(0.6931, abs=1e-3)
    if METHODS[method].quantized_base:
        assert not any(repacking(prepared.model))
