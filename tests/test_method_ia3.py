"""(IA)^3, the method added as a registry entry only (methods/ia3.py): its defining property against the
paper's formula in plain PyTorch, its trainable count against PEFT's, its bill against autograd, and a run
that trains, reloads and exports through the same code paths as every other adapter method."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from test_plan_bill import build, fp32, saved_bytes, tiny_config

from tunesmith.config import MethodConfig, load_config
from tunesmith.errors import TunesmithError
from tunesmith.methods import prepare_model
from tunesmith.planning import method_config
from tunesmith.planning.activations import activations
from tunesmith.planning.spec import spec_from_config
from tunesmith.planning.trainable import trainability, trainable_count


def cfg(recipe: dict, **method):
    return load_config({**recipe, "method": {"name": "ia3", **method}})


def test_layers_scale_outputs_and_the_down_projection_scales_its_input(tiny_recipe, tiny_model_dir):
    """y = l * (W x) on every targeted layer but down_proj, where y = W (l * x) (Liu et al. 2022)."""
    prepared = prepare_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), cfg(tiny_recipe))
    mlp = prepared.model.base_model.model.model.layers[0].mlp
    torch.manual_seed(0)
    for layer in (mlp.up_proj, mlp.down_proj):
        with torch.no_grad():
            layer.ia3_l["default"].uniform_(0.5, 1.5)
    up, down = mlp.up_proj, mlp.down_proj
    W_up, W_down = up.base_layer.weight, down.base_layer.weight
    x_up, x_down = torch.randn(3, W_up.shape[1]), torch.randn(3, W_down.shape[1])
    l_up, l_down = up.ia3_l["default"].flatten(), down.ia3_l["default"].flatten()
    assert l_up.shape == (W_up.shape[0],) and l_down.shape == (W_down.shape[1],)
    with torch.no_grad():
        torch.testing.assert_close(up(x_up), l_up * (x_up @ W_up.T))
        torch.testing.assert_close(down(x_down), (l_down * x_down) @ W_down.T)


def test_starts_as_the_base_and_trains_only_the_vectors(tiny_recipe, tiny_model_dir, tokenizer):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    prepared = prepare_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), cfg(tiny_recipe))
    assert prepared.is_adapter
    trainable = {n: p for n, p in prepared.model.named_parameters() if p.requires_grad}
    assert trainable and all(".ia3_l." in n for n in trainable)
    # by hand, tiny Llama (hidden 64, kv 32, mlp 128, 2 layers): q 64 + k 32 + v 32 + o 64 + gate 128 + up 128
    # outputs, + down_proj's 128 inputs
    assert sum(p.numel() for p in trainable.values()) == 2 * (64 + 32 + 32 + 64 + 128 + 128 + 128)
    ids = torch.tensor([tokenizer("Book Oslo for 3", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(prepared.model(input_ids=ids).logits, base(input_ids=ids).logits)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "phi3"])
@pytest.mark.parametrize("targets", ["all-linear", ["k_proj", "v_proj", "down_proj"]])
def test_trainable_count_equals_peft(family, targets):
    from peft import IA3Config, get_peft_model

    if family == "phi3" and targets != "all-linear":
        targets = ["qkv_proj", "down_proj"]
    config = tiny_config(family)
    # PEFT's own choice of feed-forward layers, except phi3 for which PEFT has none: its down_proj
    feedforward = ["down_proj"] if family == "phi3" else None
    peft_model = get_peft_model(build(config), IA3Config(task_type="CAUSAL_LM", target_modules=targets,
                                                         feedforward_modules=feedforward))
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert trainable_count(spec_from_config(config), MethodConfig(name="ia3", target_modules=targets)) == trainable


@pytest.mark.parametrize("padded", [False, True])
def test_activation_formula_equals_autograd(padded, tiny_recipe):
    config = tiny_config("llama")
    m = MethodConfig(name="ia3")
    model = prepare_model(build(config), load_config({**tiny_recipe, "method": {"name": "ia3"}})).model
    real = saved_bytes(model, batch=2, seq=24, padded=padded)
    spec = spec_from_config(config)
    predicted = activations(spec, trainability(spec, m), fp32(seq_len=24, batch=2, padded=padded)).saved
    assert abs(predicted - real) <= max(1024, 0.002 * real), (predicted, real)


def test_no_rank(tiny_recipe):
    with pytest.raises(TunesmithError, match=r"method\.r cannot be used with method\.name=ia3: it trains one scaling"):
        cfg(tiny_recipe, r=8)
    with pytest.raises(TunesmithError, match="--rank does not apply to method ia3"):
        method_config("ia3", rank=8)


def test_trains_reloads_and_exports(tiny_recipe, tmp_path, tokenizer):
    """The run folder holds an adapter that loads on the base as trained; export merges it into plain weights."""
    import tunesmith
    from tunesmith.inference import load_for_inference

    result = tunesmith.train(cfg({**tiny_recipe, "train": {**tiny_recipe["train"], "max_steps": 2, "lr": 0.05}}))
    assert result.summary["saved_as"] == "adapter" and result.summary["trainable_parameters"] == 2 * 576
    loaded = load_for_inference(str(result.output_dir))
    vectors = [p for n, p in loaded.model.named_parameters() if ".ia3_l." in n]
    assert vectors and any(not torch.equal(v, torch.ones_like(v)) for v in vectors)  # training moved them
    out = tunesmith.export(str(result.output_dir), str(tmp_path / "export"))
    plain = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([tokenizer("Book Oslo for 3", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, loaded.model(input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-5)
