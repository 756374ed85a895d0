"""QLoRA on CPU: 4-bit NF4 base with double quantization, and gradients that keep flowing after eval.

bitsandbytes repacks 4-bit weights on the first no-grad CPU forward, and only on CPUs with AVX512-BF16; after
that, gradients stop flowing. The tests that use the `avx512bf16` fixture make bitsandbytes believe the CPU has
AVX512-BF16, so the repacking switch starts on in every layer, and check that tunesmith turns it off everywhere:
that proof does not depend on the machine the tests run on.
"""
from __future__ import annotations

import pytest
import torch

from tunesmith.config import load_config
from tunesmith.methods import load_kwargs, prepare_model
from tunesmith.models import load_model


def qlora_config(tiny_recipe, model_ref):
    recipe = {**tiny_recipe, "model": str(model_ref), "method": {"name": "qlora", "r": 4, "alpha": 8, "dropout": 0.0}}
    return load_config(recipe)


def lora_grads(model) -> dict[str, float]:
    return {n: p.grad.abs().sum().item() for n, p in model.named_parameters() if "lora_" in n and p.grad is not None}


@pytest.fixture
def avx512bf16(monkeypatch):
    """Every Linear4bit built from here on starts with bitsandbytes' CPU repacking switched on."""
    import bitsandbytes.nn.modules as bnb_modules

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)


def repacking(model) -> list[bool]:
    """Per 4-bit layer: is the CPU repacking switch on, or has a weight been repacked already?"""
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 2 * 7
    return [m.support_avx512bf16_for_cpu or getattr(m.weight.quant_state, "packing_format_for_cpu", False)
            for m in layers]


def test_base_is_nf4_with_double_quant(tiny_recipe, tiny_model_dir):
    import bitsandbytes as bnb

    config = qlora_config(tiny_recipe, tiny_model_dir)
    model = load_model(config.model, **load_kwargs(config))
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 2 * 7
    state = layers[0].weight.quant_state
    assert state.quant_type == "nf4" and state.nested  # nested = double-quantized constants


def test_gradients_reach_every_adapter_also_after_generate(tiny_recipe, tiny_model_dir, tokenizer, avx512bf16):
    config = qlora_config(tiny_recipe, tiny_model_dir)
    base = load_model(config.model, **load_kwargs(config))
    assert all(repacking(base))  # as on an AVX512-BF16 CPU
    model = prepare_model(base, config).model
    assert not any(repacking(model))
    with torch.no_grad():  # B = 0 at init would zero A's gradient; make both sides live
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    x = torch.tensor([tokenizer("<|im_start|>user\nBook Oslo<|im_end|>\n", add_special_tokens=False)["input_ids"]])
    expected = {n for n, p in model.named_parameters() if "lora_" in n and p.requires_grad}

    def grads():
        model.train()
        model.zero_grad()
        model(input_ids=x, labels=x).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n and p.grad is not None}

    before = grads()
    assert set(before) == expected and all(g.abs().sum() > 0 for g in before.values())
    model.eval()  # what eval and chat do: a no-grad forward and generation
    with torch.no_grad():
        model(input_ids=x)
        model.generate(input_ids=x, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert not any(repacking(model))
    after = grads()
    assert set(after) == expected
    for name in expected:  # the same input and weights must give the same gradients as before the eval pass
        torch.testing.assert_close(after[name], before[name], rtol=1e-4, atol=1e-7, msg=name)


def test_loaded_qlora_run_never_repacks(tiny_recipe, tiny_model_dir, tokenizer, avx512bf16):
    """A trained QLoRA run loaded for eval or chat keeps the repacking off, also after generating."""
    from tunesmith.inference import generate_batch, load_for_inference
    from tunesmith.training.run import train

    config = qlora_config({**tiny_recipe, "train": {**tiny_recipe["train"], "max_steps": 1}}, tiny_model_dir)
    run = train(config, progress=False).output_dir
    loaded = load_for_inference(str(run))
    assert not any(repacking(loaded.model))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Book Oslo"}], tokenize=False,
                                           add_generation_prompt=True)
    generate_batch(loaded.model, loaded.tokenizer, [prompt], max_new_tokens=3)
    assert not any(repacking(loaded.model))


@pytest.mark.slow
def test_builtin_base_in_4bit_is_at_most_35_percent_of_fp32():
    from tunesmith.config import load_config as lc

    config = lc({"data": {"train": "x.jsonl"}, "method": {"name": "qlora"}})
    fp32 = load_model("smollm2-135m-instruct").get_memory_footprint()
    nf4 = load_model("smollm2-135m-instruct", **load_kwargs(config)).get_memory_footprint()
    assert nf4 <= 0.35 * fp32, (nf4 / 2**20, fp32 / 2**20)


def _qlora_with_random_b(tiny_recipe, tiny_model_dir, dropout: float):
    cfg = qlora_config(tiny_recipe, tiny_model_dir)
    cfg.method.dropout = dropout
    torch.manual_seed(0)
    model = prepare_model(load_model(cfg.model, **load_kwargs(cfg)), cfg).model
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    return model.train()


def test_fused_branch_over_4bit_layers_equals_pefts_forward_and_gradients(tiny_recipe, tiny_model_dir):
    from tunesmith.methods.fused_lora import use_fused_lora

    ids = torch.randint(0, 1000, (2, 9))
    results = []
    for fused in (False, True):
        model = _qlora_with_random_b(tiny_recipe, tiny_model_dir, 0.0)
        layers = use_fused_lora(model).layers if fused else 0
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, layers))
    (loss0, grads0, _), (loss1, grads1, layers) = results
    assert layers == 2 * 7  # every 4-bit projection of both layers
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=1e-6)
    assert grads0.keys() == grads1.keys() and grads0
    for n in grads0:
        torch.testing.assert_close(grads1[n], grads0[n], rtol=1e-5, atol=1e-6, msg=n)


def test_fused_branch_over_4bit_layers_keeps_fewer_activations_with_dropout(tiny_recipe, tiny_model_dir):
    from tunesmith.methods.fused_lora import use_fused_lora

    from helpers import saved_bytes

    ids = torch.randint(0, 1000, (4, 64))
    peft_model = _qlora_with_random_b(tiny_recipe, tiny_model_dir, 0.1)
    fused = _qlora_with_random_b(tiny_recipe, tiny_model_dir, 0.1)
    use_fused_lora(fused)
    peft_bytes, fused_bytes = saved_bytes(peft_model, ids), saved_bytes(fused, ids)
    assert fused_bytes < 0.8 * peft_bytes, (fused_bytes, peft_bytes)
