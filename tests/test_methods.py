"""Each method's defining property, checked against PEFT or the paper's formula computed here."""
from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from tunesmith.config import load_config
from tunesmith.errors import TunesmithError
from tunesmith.inference import load_for_inference
from tunesmith.methods import METHODS, prepare_model
from tunesmith.training.neftune import NEFTune
from tunesmith.training.run import train


def cfg(tiny_recipe, **method):
    recipe = dict(tiny_recipe)
    recipe["method"] = method
    return load_config(recipe)


def fresh(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir)


def prompt_ids(tokenizer):
    return torch.tensor([tokenizer("<|im_start|>user\nBook Oslo for 3<|im_end|>\n", add_special_tokens=False)["input_ids"]])


def test_methods_list_has_a_line_for_every_method():
    from tunesmith.config import METHOD_NAMES

    assert set(METHODS) == set(METHOD_NAMES)


def test_rslora_scales_by_alpha_over_sqrt_r(tiny_recipe, tiny_model_dir):
    prepared = prepare_model(fresh(tiny_model_dir), cfg(tiny_recipe, name="lora", r=4, alpha=8, rslora=True))
    layer = prepared.model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(8 / math.sqrt(4))
    plain = prepare_model(fresh(tiny_model_dir), cfg(tiny_recipe, name="lora", r=4, alpha=8))
    assert plain.model.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"] == pytest.approx(2.0)


def test_dora_effective_weight_follows_the_paper(tiny_recipe, tiny_model_dir):
    prepared = prepare_model(fresh(tiny_model_dir), cfg(tiny_recipe, name="dora", r=4, alpha=8, dropout=0.0))
    layer = prepared.model.base_model.model.model.layers[0].mlp.up_proj
    torch.manual_seed(0)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.5)
        layer.lora_magnitude_vector["default"].weight.mul_(torch.linspace(0.5, 1.5, layer.out_features))
    prepared.model.eval()
    W0 = layer.base_layer.weight
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    s = 8 / 4
    V = W0 + s * B @ A
    m = layer.lora_magnitude_vector["default"].weight
    W_eff = m.view(-1, 1) * V / V.norm(dim=1, keepdim=True)  # one magnitude per output feature
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ W_eff.T, atol=1e-5, rtol=1e-5)


def test_vera_trains_only_scaling_vectors_and_counts_as_the_formula(tiny_recipe, tiny_model_dir):
    r = 8
    prepared = prepare_model(fresh(tiny_model_dir), cfg(tiny_recipe, name="vera", r=r))
    model = prepared.model
    linears = [m for n, m in model.named_modules() if hasattr(m, "vera_lambda_b")]
    assert linears
    expected = sum(r + m.out_features for m in linears)  # d (r) and b (d_out) per adapted layer
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in trainable.values()) == expected
    assert all("vera_lambda" in n for n in trainable)
    assert model.get_nb_trainable_parameters()[0] == expected


def test_vera_rejects_rslora_naming_both_options(tiny_recipe):
    with pytest.raises(TunesmithError, match=r"method\.rslora cannot be used with method\.name=vera"):
        cfg(tiny_recipe, name="vera", rslora=True)


def test_qlora_rejects_galore_options_naming_both(tiny_recipe):
    with pytest.raises(TunesmithError, match=r"method\.galore_rank cannot be used with method\.name=qlora"):
        cfg(tiny_recipe, name="qlora", galore_rank=8)


def test_loraplus_gives_b_matrices_ratio_times_the_lr(tiny_recipe, tiny_model_dir):
    config = cfg(tiny_recipe, name="loraplus", r=4)
    prepared = prepare_model(fresh(tiny_model_dir), config)
    groups = {g["name"]: g for g in prepared.param_groups}
    assert groups["lora_B"]["lr_scale"] == 16.0 and groups["lora_A"]["lr_scale"] == 1.0
    names = {id(p): n for n, p in prepared.model.named_parameters()}
    assert all("lora_B" in names[id(p)] for p in groups["lora_B"]["params"])
    assert all("lora_A" in names[id(p)] for p in groups["lora_A"]["params"])

    from tunesmith.training.trainer import MethodTrainer
    from tunesmith.training.run import training_arguments

    trainer = MethodTrainer(model=prepared.model, args=training_arguments(config, config.output_dir, False),
                            param_groups=prepared.param_groups)
    opt = trainer.create_optimizer()
    b_ids = {id(p) for p in groups["lora_B"]["params"]}
    for group in opt.param_groups:
        is_b = all(id(p) in b_ids for p in group["params"])
        assert group["lr"] == pytest.approx(config.train.lr * (16.0 if is_b else 1.0))


def test_lora_ratio_option_on_plain_lora(tiny_recipe, tiny_model_dir):
    prepared = prepare_model(fresh(tiny_model_dir), cfg(tiny_recipe, name="lora", r=4, loraplus_lr_ratio=4))
    assert sorted(g["lr_scale"] for g in prepared.param_groups) == [1.0, 4.0]


def lora_weights(peft_model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(W, W + s * B @ A) of every LoRA layer by its plain model's weight name; W is the base the model runs on."""
    out = {}
    for name, m in peft_model.named_modules():
        if hasattr(m, "lora_A") and "default" in m.lora_A:
            A, B, W = m.lora_A["default"].weight, m.lora_B["default"].weight, m.base_layer.weight
            out[name.removeprefix("base_model.model.") + ".weight"] = (W, W + m.scaling["default"] * B @ A)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_olora_saved_adapter_on_the_original_base_is_the_trained_model(
    tiny_recipe, tiny_model_dir, tokenizer, monkeypatch, init
):
    """PiSSA/OLoRA train on a base whose principal part moved into the adapter; the saved adapter is converted to a
    plain LoRA that, on the original base, gives the weights the run ended with in memory: applied by hand
    (W + s * B @ A, as a merge or another runtime would) and loaded by PEFT."""
    from peft import PeftModel
    from safetensors.torch import load_file

    prepared = []  # the run's PreparedModel, to read the trained model in memory after train() returns
    monkeypatch.setattr(sys.modules[train.__module__], "prepare_model",
                        lambda *a, **kw: prepared.append(prepare_model(*a, **kw)) or prepared[-1])
    run = train(cfg(tiny_recipe, name="lora", r=4, alpha=4, init=init, dropout=0.0), progress=False)
    trained = prepared[0].model.eval()
    original = fresh(tiny_model_dir).state_dict()
    with torch.no_grad():
        in_memory = lora_weights(trained)
        reloaded = PeftModel.from_pretrained(fresh(tiny_model_dir), str(run.output_dir)).merge_and_unload().state_dict()
    assert all(not torch.allclose(residual, original[k], atol=1e-3) for k, (residual, _) in in_memory.items())
    saved = load_file(run.output_dir / "adapter_model.safetensors")
    adapter = json.loads((run.output_dir / "adapter_config.json").read_text())
    assert not adapter["rank_pattern"] and not adapter["alpha_pattern"]  # one r and alpha for every layer
    r, alpha = adapter["r"], adapter["lora_alpha"]
    scale = alpha / math.sqrt(r) if adapter["use_rslora"] else alpha / r
    for k, (_, effective) in in_memory.items():
        lora = "base_model.model." + k.removesuffix("weight")
        by_hand = original[k] + scale * saved[lora + "lora_B.weight"] @ saved[lora + "lora_A.weight"]
        torch.testing.assert_close(by_hand, effective, atol=1e-5, rtol=0)
        torch.testing.assert_close(reloaded[k], effective, atol=1e-5, rtol=0)
    assert adapter["init_lora_weights"] is True  # so PEFT does not re-run PiSSA/OLoRA on the base it loads onto
    assert any(not torch.allclose(effective, original[k], atol=1e-4) for k, (_, effective) in in_memory.items())
    x = prompt_ids(tokenizer)
    with torch.no_grad():  # and the run folder loads for inference as the model it trained
        torch.testing.assert_close(load_for_inference(str(run.output_dir)).model(x).logits, trained(x).logits,
                                   atol=1e-4, rtol=0)


def test_freeze_trains_only_the_last_layers(tiny_recipe, tiny_model_dir):
    config = cfg(tiny_recipe, name="freeze", trainable_layers=1)
    run = train(config, progress=False)
    before = fresh(tiny_model_dir).state_dict()
    after = AutoModelForCausalLM.from_pretrained(run.output_dir).state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("model.layers.1.") for k in changed)
    untouched = [k for k in before if not k.startswith("model.layers.1.")]
    assert all(torch.equal(before[k], after[k]) for k in untouched)  # bit-identical


def test_freeze_by_module_name(tiny_recipe, tiny_model_dir):
    prepared = prepare_model(fresh(tiny_model_dir), cfg(tiny_recipe, name="freeze", trainable_modules=["mlp.down_proj"]))
    names = [n for n, p in prepared.model.named_parameters() if p.requires_grad]
    assert names == ["model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    with pytest.raises(TunesmithError, match="matches no parameter"):
        prepare_model(fresh(tiny_model_dir), cfg(tiny_recipe, name="freeze", trainable_modules=["nope"]))


def test_full_trains_every_parameter(tiny_recipe, tiny_model_dir):
    prepared = prepare_model(fresh(tiny_model_dir), cfg(tiny_recipe, name="full"))
    assert all(p.requires_grad for p in prepared.model.parameters())
    assert not prepared.is_adapter


@pytest.mark.slow
def test_adalora_rank_budget_falls_on_schedule(tiny_recipe, tiny_model_dir):
    recipe = dict(tiny_recipe)
    recipe["train"] = {**recipe["train"], "max_steps": 10}
    recipe["method"] = {"name": "adalora", "init_r": 6, "target_r": 2, "tinit": 2, "tfinal": 2, "delta_t": 1}
    config = load_config(recipe)
    from tunesmith.data.assemble import prepare_data
    from tunesmith.models import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    prepared = prepare_model(fresh(tiny_model_dir), config, total_steps=10)
    callback = prepared.callbacks[0]
    from tunesmith.data.collate import PaddingCollator
    from tunesmith.training.run import ExampleDataset, training_arguments
    from tunesmith.training.trainer import MethodTrainer

    data = prepare_data(config, tokenizer)
    trainer = MethodTrainer(model=prepared.model, args=training_arguments(config, config.output_dir, False),
                            param_groups=prepared.param_groups, train_dataset=ExampleDataset(data.train),
                            data_collator=PaddingCollator(tokenizer.pad_token_id), callbacks=[callback])
    trainer.train()
    budgets = [b for _, b in callback.budgets]
    layers = sum(1 for _, m in prepared.model.named_modules() if hasattr(m, "lora_E") and "default" in m.lora_E)
    assert budgets[0] == 6 * layers  # no pruning during tinit
    assert budgets[-1] == 2 * layers  # the target budget in the final phase
    assert all(a >= b for a, b in zip(budgets, budgets[1:]))  # never grows


def test_adalora_adds_the_orthogonality_regulariser(tiny_recipe, tiny_model_dir, tokenizer):
    config = cfg(tiny_recipe, name="adalora", init_r=4, target_r=2, orth_reg_weight=0.5, dropout=0.0)
    model = prepare_model(fresh(tiny_model_dir), config, total_steps=10).model
    x = prompt_ids(tokenizer)
    model.train()
    with_reg = model(input_ids=x, labels=x).loss
    model.peft_config["default"].orth_reg_weight = 0.0
    without = model(input_ids=x, labels=x).loss
    reg = 0.0
    n = 0
    for name, p in model.named_parameters():
        if ("lora_A" in name or "lora_B" in name) and "default" in name:
            cov = p @ p.T if "lora_A" in name else p.T @ p
            reg += torch.linalg.norm(cov - torch.eye(cov.shape[0]), "fro")
            n += 1
    assert (with_reg - without).item() == pytest.approx(0.5 * (reg / n).item(), rel=1e-4)


@pytest.mark.slow
def test_galore_keeps_optimizer_moments_in_the_projected_space(tiny_recipe, tiny_model_dir):
    recipe = dict(tiny_recipe)
    recipe["method"] = {"name": "galore", "galore_rank": 4, "update_proj_gap": 2}
    recipe["train"] = {**recipe["train"], "max_steps": 3}
    config = load_config(recipe)
    from tunesmith.data.collate import PaddingCollator
    from tunesmith.data.assemble import prepare_data
    from tunesmith.models import load_tokenizer
    from tunesmith.training.run import ExampleDataset, training_arguments
    from tunesmith.training.trainer import MethodTrainer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    prepared = prepare_model(fresh(tiny_model_dir), config)
    data = prepare_data(config, tokenizer)
    trainer = MethodTrainer(model=prepared.model, args=training_arguments(config, config.output_dir, False, prepared.training_args),
                            param_groups=prepared.param_groups, train_dataset=ExampleDataset(data.train),
                            data_collator=PaddingCollator(tokenizer.pad_token_id))
    trainer.train()
    opt = trainer.optimizer
    projected = 0
    full_bytes = galore_bytes = 0
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state.get(p, {})
            if "exp_avg" not in state:
                continue
            full_bytes += 2 * p.numel() * 4
            galore_bytes += (state["exp_avg"].numel() + state["exp_avg_sq"].numel()) * 4
            if "rank" in group and p.ndim == 2:
                assert 4 in state["exp_avg"].shape and state["exp_avg"].numel() < p.numel()
                assert "projector" in state and state["projector"].update_proj_gap == 2
                projected += 1
    assert projected == 2 * 7  # 7 projections per layer, 2 layers
    assert galore_bytes < full_bytes


def test_neftune_noise_magnitude_and_no_noise_in_eval(tiny_model_dir):
    model = fresh(tiny_model_dir)
    alpha, L, d = 5.0, 40, model.config.hidden_size
    hook = NEFTune(model, alpha)
    emb = model.get_input_embeddings()
    ids = torch.randint(0, 1000, (64, L))
    mask = torch.ones_like(ids)
    captured = {}
    handle = emb.register_forward_hook(lambda m, i, o: captured.__setitem__("out", o))
    model.train()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    noise = captured["out"] - emb.weight[ids]
    assert noise.abs().max() <= alpha / math.sqrt(L * d) + 1e-6
    # the paper's noise: U(-1, 1) * alpha / sqrt(L d), whose standard deviation is alpha / sqrt(L d) / sqrt(3)
    assert noise.std().item() == pytest.approx(alpha / math.sqrt(L * d) / math.sqrt(3), rel=0.05)
    model.eval()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert torch.equal(captured["out"], emb.weight[ids])
    # padding does not change an example's noise: the scale uses each row's real length
    mask[:, L // 2:] = 0
    model.train()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    half = (captured["out"] - emb.weight[ids])[:, : L // 2]
    assert half.abs().max() > alpha / math.sqrt(L * d)
    assert half.abs().max() <= alpha / math.sqrt(L // 2 * d) + 1e-6
    handle.remove()
    hook.remove()


def test_adalora_orthogonality_term_equals_pefts_and_counts_once_per_step(tiny_recipe, tiny_model_dir, tokenizer):
    """The term the selective loss adds equals what PEFT's forward adds to its own loss, in value and gradient."""
    config = cfg(tiny_recipe, name="adalora", init_r=4, target_r=2, orth_reg_weight=0.5, dropout=0.0)
    prepared = prepare_model(fresh(tiny_model_dir), config, total_steps=10)
    model = prepared.model.train()
    (term,) = prepared.loss_terms
    x = prompt_ids(tokenizer)
    factors = [p for n, p in model.named_parameters() if "lora_A" in n or "lora_B" in n]
    peft_loss = model(input_ids=x, labels=x).loss
    model.peft_config["default"].orth_reg_weight = 0.0
    plain_loss = model(input_ids=x, labels=x).loss
    want = torch.autograd.grad(peft_loss - plain_loss, factors)
    ours = term(model, {}, None)
    assert ours.item() == pytest.approx((peft_loss - plain_loss).item(), rel=1e-5)
    for g, w in zip(torch.autograd.grad(ours, factors), want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7)
    # micro batches of 3 and 5 supervised targets in an accumulated batch of 8 add up to one term
    halves = term(model, {"labels": torch.tensor([[-100, 1, 2, 3]]), "num_items_in_batch": 8}, None) + \
        term(model, {"labels": torch.tensor([[-100, 1, 2, 3, 4, 5]]), "num_items_in_batch": 8}, None)
    assert halves.item() == pytest.approx(ours.item(), rel=1e-6)


def test_adalora_fused_branch_equals_pefts_svd_forward(tiny_recipe, tiny_model_dir, tokenizer):
    from tunesmith.methods.fused_lora import use_fused_lora

    x = prompt_ids(tokenizer)
    results = []
    for fused in (False, True):
        config = cfg(tiny_recipe, name="adalora", init_r=4, target_r=2, dropout=0.0)
        torch.manual_seed(0)
        model = prepare_model(fresh(tiny_model_dir), config, total_steps=10).model.train()
        for n, p in model.named_parameters():
            if "lora_E" in n:
                torch.nn.init.normal_(p, std=0.5)  # PEFT starts E at zero: the branch would be silent
        layers = use_fused_lora(model).layers if fused else 0
        model.peft_config["default"].orth_reg_weight = 0.0
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, layers))
    (loss0, grads0, _), (loss1, grads1, layers) = results
    assert layers == 2 * 7 and loss0 != 0
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=1e-6)
    assert grads0.keys() == grads1.keys()
    for n in grads0:
        torch.testing.assert_close(grads1[n], grads0[n], rtol=1e-4, atol=1e-6, msg=n)
    assert any("lora_E" in n and g.abs().sum() > 0 for n, g in grads1.items())


def test_adalora_allocator_state_is_on_the_bill(tiny_recipe, tiny_model_dir, tokenizer):
    """PEFT's rank allocator keeps three fp32 tensors per adapter parameter from its first update on."""
    from tunesmith.planning.bill import compute_bill
    from tunesmith.planning.setup import Setup

    config = cfg(tiny_recipe, name="adalora", init_r=4, target_r=2, dropout=0.0)
    model = prepare_model(fresh(tiny_model_dir), config, total_steps=10).model.train()
    x = prompt_ids(tokenizer)
    model(input_ids=x, labels=x).loss.backward()
    allocator = model.base_model.rankallocator
    allocator.update_ipt(model)
    kept = sum(t.numel() * t.element_size() for d in (allocator.ipt, allocator.exp_avg_ipt, allocator.exp_avg_unc)
               for t in d.values())
    bill = compute_bill(str(tiny_model_dir), config.method, Setup(seq_len=16, precision="fp32"))
    assert bill.line("adapter_state").bytes == kept == 3 * bill.trainable_params * 4
