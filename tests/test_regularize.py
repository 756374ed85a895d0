"""`regularize`: replay at an exact ratio and weighted mixing; distillation to the frozen base (fused loss against
plain PyTorch, KD = 0 at LoRA init, the SFT normaliser); EWC (Fisher against finite differences, the penalty,
the run-folder file); and one short training run with all three wired in.
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import torch

from tunesmith.config import load_config
from tunesmith.data.collate import PaddingFreeCollator
from tunesmith.errors import TunesmithError
from tunesmith.data.assemble import prepare_data
from tunesmith.data.mixing import interleave, largest_remainder

from helpers import write_jsonl


def _recipe(tmp: Path, model_dir, rows, **extra) -> dict:
    write_jsonl(tmp / "train.jsonl", rows[:-4])
    write_jsonl(tmp / "eval.jsonl", rows[-4:])
    recipe = {
        "model": str(model_dir),
        "data": {"train": str(tmp / "train.jsonl"), "eval": str(tmp / "eval.jsonl"), "max_length": 256},
        "method": {"name": "lora", "r": 4, "alpha": 8},
        "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-3, "bf16": False, "eval_each_epoch": False},
        "eval": {"scorer": "json_match", "max_new_tokens": 4, "batch_size": 2},
        "output_dir": str(tmp / "run"),
    }
    for key, value in extra.items():
        recipe.setdefault(key, {}).update(value)
    return recipe


def _booking(n, seed=1):
    from tunesmith.demo.booking import generate

    return generate(n_train=n, n_eval=1, seed=seed)[0]


def _prefix_counts_ok(flags: list[bool], share: float) -> bool:
    """In every prefix of m examples the flagged ones number m * share, within one."""
    seen = 0
    for m, f in enumerate(flags, start=1):
        seen += f
        if abs(seen - m * share) >= 1:
            return False
    return True


# --- replay and weighted mixing -------------------------------------------------------------------


def test_largest_remainder_and_interleave():
    assert largest_remainder(10, [1, 1, 1]) == [4, 3, 3]
    assert largest_remainder(32, [1, 3]) == [8, 24]
    assert sum(largest_remainder(17, [0.2, 0.5, 0.3])) == 17
    assert min(largest_remainder(5, [100, 1])) == 1  # every dataset appears
    mixed = interleave([list(range(19)), ["r"] * 5])
    assert len(mixed) == 24 and [x for x in mixed if x != "r"] == list(range(19))  # each stream keeps its order
    assert _prefix_counts_ok([x == "r" for x in mixed], 5 / 24)


def test_replay_general_exact_ratio(tmp_path, tiny_model_dir, tokenizer):
    from tunesmith.data.general import general_text

    config = load_config(_recipe(tmp_path, tiny_model_dir, _booking(28), regularize={"replay": {"ratio": 0.2}}))
    data = prepare_data(config, tokenizer)
    flags = [e.where.startswith("general") for e in data.train]
    assert len(data.train) == 30 and sum(flags) == 6  # 6 / (24 + 6) = 0.2 exactly
    assert _prefix_counts_ok(flags, 0.2)  # exact in every window, so in any step budget
    replay = data.mix["replay"]
    assert replay["examples"] == 6 and replay["share"] == 0.2
    task = [e for e, f in zip(data.train, flags) if not f]
    assert replay["chunk_tokens"] == int(statistics.median(e.num_supervised for e in task)) + 1
    assert abs(replay["supervised_token_share"] - 0.2) < 0.05  # chunks sized like the answers: examples ~ loss share
    held = general_text("heldout")
    for e in data.train:
        if e.where.startswith("general"):
            assert all(t == i for t, i in zip(e.labels, e.input_ids))  # plain text: every token supervised
            assert tokenizer.decode(e.input_ids) not in held  # never the text eval --forgetting measures
    assert len({e.where for e in task}) == 24  # every task example once
    assert len(data.eval) == 4


def test_weighted_mixing_and_entries(tmp_path, tiny_model_dir, tokenizer):
    from tunesmith.demo.shopping import generate as shopping

    write_jsonl(tmp_path / "shop.jsonl", shopping(n_train=8, n_eval=1, seed=2)[0])
    recipe = _recipe(tmp_path, tiny_model_dir, _booking(28))
    recipe["data"]["train"] = [{"path": str(tmp_path / "train.jsonl"), "weight": 1},
                               {"path": str(tmp_path / "shop.jsonl"), "weight": 3}]
    config = load_config(recipe)
    assert config.data.weights == [1.0, 3.0] and config.data.train[1].endswith("shop.jsonl")
    data = prepare_data(config, tokenizer)
    assert [d["used"] for d in data.mix["datasets"]] == [8, 24]  # 32 examples, 1:3
    shop = [e.where for e in data.train if "shop.jsonl" in e.where]
    assert len(shop) == 24 and all(shop.count(w) == 3 for w in set(shop))  # 8 rows, 3 whole passes
    booking = [e.where for e in data.train if "train.jsonl" in e.where]
    assert len(booking) == len(set(booking)) == 8  # 24 rows subsampled to 8
    assert _prefix_counts_ok(["shop.jsonl" in e.where for e in data.train], 0.75)


def test_replay_from_a_dataset_file(tmp_path, tiny_model_dir, tokenizer):
    from tunesmith.demo.shopping import generate as shopping

    write_jsonl(tmp_path / "old.jsonl", shopping(n_train=5, n_eval=1, seed=4)[0])
    config = load_config(_recipe(tmp_path, tiny_model_dir, _booking(24),
                                 regularize={"replay": {"ratio": 0.5, "source": str(tmp_path / "old.jsonl")}}))
    data = prepare_data(config, tokenizer)
    old = [e for e in data.train if "old.jsonl" in e.where]
    assert len(old) == 20 and len(data.train) == 40  # 20 task examples, ratio 0.5
    assert all(set(e.labels) != {-100} for e in old) and data.mix["replay"]["chunk_tokens"] is None


@pytest.mark.parametrize("data, message", [
    ({"train": ["a.jsonl", "b.jsonl"], "weights": [1]}, "data.weights has 1 entries but data.train has 2"),
    ({"train": ["a.jsonl", "b.jsonl"], "weights": [1, 0]}, "every weight must be > 0"),
    ({"train": [{"path": "a.jsonl", "wieght": 2}]}, "unknown: wieght"),
    ({"train": ["a.jsonl", "b.jsonl"], "task_prefix": ["[A]"]}, "data.task_prefix has 1 entries"),
])
def test_mixing_config_errors(data, message):
    with pytest.raises(TunesmithError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config({"data": data})


def test_regularize_config_errors():
    with pytest.raises(TunesmithError, match="regularize.replay.ratio"):
        load_config({"data": {"train": "a.jsonl"}, "regularize": {"replay": {"ratio": 1.0}}})
    with pytest.raises(TunesmithError, match="did you mean 'regularize.distill.temperature'"):
        load_config({"data": {"train": "a.jsonl"}, "regularize": {"distill": {"temprature": 2}}})
    with pytest.raises(TunesmithError, match="set train.selective_loss: true"):
        load_config({"data": {"train": "a.jsonl"}, "regularize": {"ewc": {}}, "train": {"selective_loss": False}})
    cfg = load_config({"data": {"train": "a.jsonl"}, "regularize": {"ewc": {"lambda": 5}}}, ["regularize.ewc.lambda=7"])
    assert cfg.regularize.ewc.lambda_ == 7.0 and cfg.regularize.distill is None


# --- distillation ---------------------------------------------------------------------------------


def test_fused_kd_matches_plain_pytorch():
    from tunesmith.regularize.distill import _DistillMinusCrossEntropy

    torch.manual_seed(0)
    h = torch.randn(7, 5, requires_grad=True)
    W = torch.randn(11, 5, requires_grad=True)
    ht, t = torch.randn(7, 5), torch.randint(0, 11, (7,))
    alpha, T, scale = 0.3, 2.0, 1 / 5
    out, kd, ce = _DistillMinusCrossEntropy.apply(h, W, ht, W.detach(), t, alpha, T, scale, 3)  # 3-row chunks
    zs, zt = h @ W.T, ht @ W.detach().T
    ref_kd = T * T * (torch.softmax(zt / T, -1) * (torch.log_softmax(zt / T, -1) - torch.log_softmax(zs / T, -1))).sum()
    ref_ce = torch.nn.functional.cross_entropy(zs, t, reduction="sum")
    ref = (1 - alpha) * scale * (ref_kd - ref_ce)
    assert kd.item() == pytest.approx(ref_kd.item(), rel=1e-5) and ce.item() == pytest.approx(ref_ce.item(), rel=1e-5)
    assert out.item() == pytest.approx(ref.item(), rel=1e-5)
    for got, want in zip(torch.autograd.grad(out, [h, W]), torch.autograd.grad(ref, [h, W])):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def _lora_and_batch(tiny_model_dir, tokenizer, n=4):
    from tunesmith.data.masking import tokenize_conversation
    from tunesmith.data.formats import to_conversation
    from tunesmith.data.loading import Row
    from tunesmith.methods.lora import prepare_lora
    from tunesmith.models import load_model

    torch.manual_seed(0)
    config = load_config({"model": str(tiny_model_dir), "data": {"train": "x.jsonl"}, "method": {"r": 4, "alpha": 8, "dropout": 0.0}})
    model = prepare_lora(load_model(str(tiny_model_dir)), config).model
    rows = _booking(n, seed=5)
    feats = []
    for r in rows:
        ex = tokenize_conversation(tokenizer, to_conversation(Row(r, "t"), "auto"))
        feats.append({"input_ids": ex.input_ids, "labels": ex.labels})
    return model, feats


def _sft_and_hidden(model, inputs, normaliser=None):
    from tunesmith.modeling import causal_lm, decoder_body
    from tunesmith.training.loss import selective_cross_entropy

    hidden = decoder_body(model)(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"], use_cache=False).last_hidden_state
    head = causal_lm(model).get_output_embeddings().weight
    return selective_cross_entropy(hidden, head, inputs["labels"], normaliser)[0], hidden


def test_kd_is_zero_at_lora_init_and_matches_reference_after(tiny_model_dir, tokenizer):
    from tunesmith.models import load_model
    from tunesmith.regularize.distill import DistillTerm

    model, feats = _lora_and_batch(tiny_model_dir, tokenizer)
    model.train()
    inputs = PaddingFreeCollator()(feats)
    inputs.pop("attention_mask")
    term = DistillTerm(model, alpha=0.25, temperature=2.0)
    sft, hidden = _sft_and_hidden(model, inputs)
    value = term(model, inputs, hidden)
    assert term.last["kd"] == 0.0  # B = 0: the student is the base
    assert (sft + value).item() == pytest.approx(0.25 * sft.item(), rel=1e-5)

    with torch.no_grad():  # move away from init
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    sft, hidden = _sft_and_hidden(model, inputs)
    total = sft + term(model, inputs, hidden)
    # Independent reference: full logits of the trained model and of the base loaded on its own.
    base = load_model(str(tiny_model_dir)).eval()
    pos = inputs["position_ids"]
    zs = model(input_ids=inputs["input_ids"], position_ids=pos, use_cache=False).logits[0, :-1]
    with torch.no_grad():
        zt = base(input_ids=inputs["input_ids"], position_ids=pos, use_cache=False).logits[0, :-1]
    tgt = inputs["labels"][0, 1:]
    keep = tgt != -100
    T = 2.0
    kd = T * T * torch.nn.functional.kl_div(torch.log_softmax(zs[keep] / T, -1), torch.log_softmax(zt[keep] / T, -1),
                                            log_target=True, reduction="sum") / keep.sum()
    ce = torch.nn.functional.cross_entropy(zs[keep], tgt[keep])
    ref = 0.25 * ce + 0.75 * kd
    assert kd.item() > 1e-3 and term.last["kd"] == pytest.approx(kd.item(), rel=1e-4)
    assert total.item() == pytest.approx(ref.item(), rel=1e-4)
    lora = [p for n, p in model.named_parameters() if p.requires_grad]
    for got, want in zip(torch.autograd.grad(total, lora), torch.autograd.grad(ref, lora)):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-7)


def test_kd_uses_the_sft_normaliser(tiny_model_dir, tokenizer):
    """Two micro batches normalised by the accumulated count add up to the one-batch loss (as the SFT does)."""
    from tunesmith.regularize.distill import DistillTerm

    model, feats = _lora_and_batch(tiny_model_dir, tokenizer)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    term = DistillTerm(model, alpha=0.5, temperature=1.5)

    def loss(batch, n_items):
        inputs = PaddingFreeCollator()(batch)
        inputs.pop("attention_mask")
        inputs["num_items_in_batch"] = n_items
        sft, hidden = _sft_and_hidden(model, inputs, n_items)
        return sft + term(model, inputs, hidden)

    whole_inputs = PaddingFreeCollator()(feats)
    n_items = int((whole_inputs["labels"][:, 1:] != -100).sum())
    one = loss(feats, n_items)
    two = loss(feats[:2], n_items) + loss(feats[2:], n_items)
    assert two.item() == pytest.approx(one.item(), rel=1e-5)


# --- EWC ------------------------------------------------------------------------------------------


def test_fisher_matches_finite_differences():
    """F_i = mean over examples of (d loss_n / d theta_i)^2, checked entry by entry with central differences (fp64),
    on a micro Llama (vocab 96, hidden 16, one layer) with LoRA on every linear layer and random lora_B."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunesmith.data.masking import TokenizedExample
    from tunesmith.regularize.ewc import diagonal_fisher, example_loss

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", lora_dropout=0.0))
    model = model.double().eval()
    for module in model.modules():  # Llama's RMSNorm computes in fp32; keep fp64 so finite differences are precise
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = lambda x, m=module: m.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + m.variance_epsilon))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    g = torch.Generator().manual_seed(1)
    examples = []
    for length, prompt in ((12, 5), (9, 3), (15, 10)):
        ids = torch.randint(0, 96, (length,), generator=g).tolist()
        examples.append(TokenizedExample(ids, [-100] * prompt + ids[prompt:], []))
    fisher = diagonal_fisher(model, examples + [TokenizedExample([1, 2, 3], [-100] * 3, [])])  # unsupervised: skipped
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(fisher) == set(named) and all(f.dtype == torch.float32 for f in fisher.values())
    eps = 1e-6
    for k, n in enumerate(sorted(named)[::3]):  # A and B matrices of several layers; the largest entry or a random one
        p = named[n].data.view(-1)
        for i in [int(fisher[n].flatten().argmax()) if k % 2 else int(torch.randint(0, p.numel(), (1,), generator=g))]:
            grads = []
            for ex in examples:
                old = p[i].item()
                with torch.no_grad():
                    p[i] = old + eps
                    up = example_loss(model, ex).item()
                    p[i] = old - eps
                    down = example_loss(model, ex).item()
                    p[i] = old
                grads.append((up - down) / (2 * eps))
            brute = sum(x * x for x in grads) / len(grads)
            assert fisher[n].view(-1)[i].item() == pytest.approx(brute, rel=1e-5, abs=1e-12), (n, i)
    assert all(f.max() > 0 for f in fisher.values())


def test_ewc_penalty_and_once_per_step():
    from tunesmith.regularize.ewc import EWCTerm

    lin = torch.nn.Linear(3, 2)
    ref = {n: p.detach().clone() for n, p in lin.named_parameters()}
    fisher = {n: torch.rand(p.shape) for n, p in lin.named_parameters()}
    with torch.no_grad():
        lin.weight.add_(0.5)
    term = EWCTerm(lin, fisher, ref, lam=4.0)
    want = 0.5 * 4.0 * sum((fisher[n] * (p - ref[n]) ** 2).sum() for n, p in lin.named_parameters())
    assert term.penalty().item() == pytest.approx(want.item(), rel=1e-6)
    params = list(lin.parameters())
    got = torch.autograd.grad(term.penalty(), params)
    plain = torch.autograd.grad(0.5 * 4.0 * sum((fisher[n] * (p - ref[n]) ** 2).sum()
                                                for n, p in lin.named_parameters()), params)
    for g, w in zip(got, plain):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=0)
    labels = torch.tensor([[-100, 5, 6, -100, 7]])  # 3 supervised targets after the shift
    # Micro batches of 3 and 5 targets in an accumulated batch of 8: the shares add up to one penalty.
    total = term(lin, {"labels": labels, "num_items_in_batch": 8}, None)
    total = total + term(lin, {"labels": torch.tensor([[-100, 1, 2, 3, 4, 5]]), "num_items_in_batch": 8}, None)
    assert total.item() == pytest.approx(want.item(), rel=1e-6)
    with pytest.raises(TunesmithError, match="no entry for"):
        EWCTerm(lin, {}, {}, lam=1.0)


# --- one run with replay, distill and EWC ---------------------------------------------------------


@pytest.mark.slow
def test_training_run_with_replay_distill_and_ewc(tmp_path, tiny_model_dir, monkeypatch):
    from safetensors.torch import load_file

    from tunesmith.regularize.distill import DistillTerm
    from tunesmith.regularize.ewc import EWCTerm
    from tunesmith.training.run import train
    from tunesmith.training.trainer import MethodTrainer

    seen_batches, calls = [], {"distill": 0, "ewc": 0}
    original = MethodTrainer.compute_loss

    def spy(self, model, inputs, *args, **kwargs):
        if model.training:
            seen_batches.append(inputs["input_ids"][0].tolist())
        return original(self, model, inputs, *args, **kwargs)

    for cls, key in ((DistillTerm, "distill"), (EWCTerm, "ewc")):
        orig = cls.__call__
        monkeypatch.setattr(cls, "__call__", lambda self, *a, _o=orig, _k=key: (calls.__setitem__(_k, calls[_k] + 1), _o(self, *a))[1])
    monkeypatch.setattr(MethodTrainer, "compute_loss", spy)

    recipe = _recipe(tmp_path, tiny_model_dir, _booking(20), regularize={
        "replay": {"ratio": 0.25}, "distill": {"alpha": 0.5}, "ewc": {"lambda": 10, "samples": 3, "chunk_tokens": 24}})
    result = train(load_config(recipe), progress=False)
    run = result.output_dir
    assert calls == {"distill": 2, "ewc": 2}
    s = result.summary["regularize"]
    assert s["distill"] == {"alpha": 0.5, "temperature": 2.0}
    assert s["ewc"]["samples"] == 3 and s["ewc"]["fisher_sum"] > 0 and s["ewc"]["file"] == "ewc.safetensors"
    assert s["replay"]["examples"] == 5 and s["replay"]["share"] == round(5 / 21, 4)  # round(0.25 * 16 / 0.75) = 5
    stats = json.loads((run / "data_stats.json").read_text())
    assert stats["mix"]["replay"]["examples"] == 5 and stats["train"]["examples"] == 21
    stored = load_file(run / "ewc.safetensors")
    assert any(k.startswith("fisher/") and "lora_B" in k for k in stored)
    assert {k.split("/", 1)[1] for k in stored if k.startswith("fisher/")} == {k.split("/", 1)[1] for k in stored if k.startswith("reference/")}
    # The trainer read the mixed data in its exact order (sequential sampling).
    from tunesmith.models import load_tokenizer

    expected = prepare_data(load_config(recipe), load_tokenizer(str(tiny_model_dir))).train
    first = [t for e in expected[:4] for t in e.input_ids]
    assert seen_batches[0] == first
    assert math.isfinite(result.summary["train_loss"])


def test_recipes_load():
    repo = Path(__file__).resolve().parent.parent / "recipes"
    assert load_config(repo / "replay.yaml").regularize.replay.ratio == 0.1
    assert load_config(repo / "distill.yaml").regularize.distill.alpha == 0.9  # the sweep's choice
    assert load_config(repo / "ewc.yaml").regularize.ewc.lambda_ == 1e5
    for strategy in ("progressive", "o-lora", "merge", "separate"):
        cfg = load_config(repo / f"continual-{strategy}.yaml")
        assert cfg.continual.strategy == strategy and cfg.continual.previous == ["runs/continual-task1"]
        assert cfg.data.task_prefix == "[Shopping]"
    assert load_config(repo / "continual-task1.yaml").data.task_prefix == "[Booking]"
