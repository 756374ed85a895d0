"""`tunesmith.merge` end to end on tiny random Llama models and PEFT adapters.

References are independent of the engine: plain torch on whole state dicts for the full-model
methods, with TIES, DARE and SLERP written out here from their papers (DARE's random masks are read
back from merges where one model alone has a task vector), and PEFT's merge_and_unload for adapter
task vectors (scale * B @ A).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import tunesmith
from tunesmith.errors import TunesmithError
from tunesmith.merging.io import INDEX_FILE
from tunesmith.merging.spec import load_merge_spec


# ---- building inputs ------------------------------------------------------------------------------------
def make_llama(path: Path, seed: int = 0, hidden: int = 16, layers: int = 2, vocab: int = 64, tie: bool = True,
               max_shard_size: str | None = None) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tie)
    model = LlamaForCausalLM(config)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return path


def fine_tuned(base: Path, out: Path, seed: int, scale: float = 0.05) -> Path:
    """A 'fine-tuned' copy of base: every float tensor plus seeded noise."""
    out.mkdir(parents=True)
    for f in base.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)
    g = torch.Generator().manual_seed(seed)
    for f in base.glob("*.safetensors"):
        sd = load_file(f)
        save_file({k: v + scale * torch.randn(v.shape, generator=g) for k, v in sd.items()}, out / f.name,
                  metadata={"format": "pt"})
    return out


def make_adapter(base: Path, out: Path, seed: int, r: int = 4, alpha: float = 8, use_rslora: bool = False,
                 target_modules="all-linear") -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=target_modules, use_rslora=use_rslora,
                        task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "lora_A" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(out)
    return out


def peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter))
    merged = model.merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items() if k != "lm_head.weight"}


def weights_of(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    base = make_llama(root / "base", seed=0)
    return {
        "root": root,
        "base": base,
        "m1": fine_tuned(base, root / "m1", seed=1),
        "m2": fine_tuned(base, root / "m2", seed=2),
        "m3": fine_tuned(base, root / "m3", seed=3),
        "a1": make_adapter(base, root / "a1", seed=1),
        "a2": make_adapter(base, root / "a2", seed=2, r=2, alpha=4, use_rslora=True,
                           target_modules=["q_proj", "v_proj", "down_proj"]),
    }


def run_merge(spec: dict, out: Path, **kw) -> dict[str, torch.Tensor]:
    tunesmith.merge(spec, out, progress=False, **kw)
    return weights_of(out)


def assert_nothing_written(tmp_path: Path, name: str = "out") -> None:
    leftovers = [p.name for p in tmp_path.iterdir() if p.name == name or p.name.startswith(f".{name}.")]
    assert leftovers == []


# ---- full models, each method against plain torch --------------------------------------------------------
def test_linear_is_the_weighted_average(zoo, tmp_path):
    w = [weights_of(zoo[k]) for k in ("m1", "m2", "m3")]
    out = run_merge({"method": "linear", "models": [{"model": str(zoo["m1"]), "weight": 1},
                                                    {"model": str(zoo["m2"]), "weight": 2},
                                                    {"model": str(zoo["m3"]), "weight": 1}]}, tmp_path / "out")
    assert set(out) == set(w[0])
    for k in out:
        assert torch.allclose(out[k], (w[0][k] + 2 * w[1][k] + w[2][k]) / 4, atol=1e-6), k


def test_task_arithmetic_with_negative_weight(zoo, tmp_path):
    base, m1, m2 = (weights_of(zoo[k]) for k in ("base", "m1", "m2"))
    out = run_merge({"method": "task_arithmetic", "base_model": str(zoo["base"]), "lambda": 0.5,
                     "models": [{"model": str(zoo["m1"]), "weight": 1.0},
                                {"model": str(zoo["m2"]), "weight": -0.5}]}, tmp_path / "out")
    for k in out:
        expected = base[k] + 0.5 * ((m1[k] - base[k]) - 0.5 * (m2[k] - base[k]))
        assert torch.allclose(out[k], expected, atol=1e-6), k
    # subtracting what was added gives the base back
    out = run_merge({"method": "task_arithmetic", "base_model": str(zoo["base"]),
                     "models": [{"model": str(zoo["m1"]), "weight": 1}, {"model": str(zoo["m1"]), "weight": -1}]},
                    tmp_path / "out2")
    assert all(torch.allclose(out[k], base[k], atol=1e-6) for k in out)


# TIES, DARE and SLERP written out from their papers
def disjoint_mean(weighted: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """TIES' sign election and disjoint mean: the sign of the sum of the weighted task vectors per entry; the
    mean of the entries that agree with it, weighted by |w| (an entry with a tied sign, or none agreeing, is 0)."""
    sign = torch.sign(sum(weighted))
    agree = [(t * sign) > 0 for t in weighted]
    total = sum(t * a for t, a in zip(weighted, agree))
    count = sum(abs(w) * a.double() for w, a in zip(weights, agree))
    return torch.where(count > 0, total / count.clamp(min=1e-12), torch.zeros_like(total))


def top_k_by_magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES' trim: keep the density * n entries of largest magnitude. The tests pick densities that make
    density * n whole for every tensor, so rounding it up or down cannot matter."""
    k = density * delta.numel()
    assert k == int(k), (density, delta.shape)
    keep = torch.zeros(delta.numel(), dtype=torch.bool)
    keep[delta.flatten().abs().topk(int(k)).indices] = True
    return delta * keep.view(delta.shape)


def slerp_formula(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """sin((1-t)θ)/sin θ · a + sin(tθ)/sin θ · b, θ the angle between a and b seen as flat vectors."""
    a64, b64 = a.double().flatten(), b.double().flatten()
    cos = torch.dot(a64, b64) / (a64.norm() * b64.norm())
    assert abs(cos) < 0.999, "nearly parallel: this reference has no lerp fallback"
    theta = torch.arccos(cos)
    out = torch.sin((1 - t) * theta) / torch.sin(theta) * a64 + torch.sin(t * theta) / torch.sin(theta) * b64
    return out.view(a.shape).float()


@pytest.fixture(scope="module")
def zero_delta_model(zoo):
    """A copy of the base under another path: its task vector is 0, yet it takes a model index in a spec."""
    return fine_tuned(zoo["base"], zoo["root"] / "zero", seed=0, scale=0.0)


def test_ties_follows_the_paper_tensor_by_tensor(zoo, tmp_path):
    base, m1, m2 = (weights_of(zoo[k]) for k in ("base", "m1", "m2"))
    # every tensor here has a multiple of 16 entries: 0.25 and 0.75 keep a whole number of them
    models = [{"model": str(zoo["m1"]), "weight": 1.0, "density": 0.25}, {"model": str(zoo["m2"]), "weight": 0.7}]
    out = run_merge({"method": "ties", "base_model": str(zoo["base"]), "models": models, "density": 0.75,
                     "lambda": 0.9}, tmp_path / "ties")
    for k in base:
        trimmed = [1.0 * top_k_by_magnitude(m1[k] - base[k], 0.25), 0.7 * top_k_by_magnitude(m2[k] - base[k], 0.75)]
        expected = base[k] + 0.9 * disjoint_mean(trimmed, [1.0, 0.7])
        assert torch.allclose(out[k], expected.float(), atol=1e-6), k


def dropped_delta(zoo, models: list[dict], out: Path, rescale: str = "inverse_density") -> dict:
    """out - base of a dare_linear merge where only one model has a non-zero task vector (weight 1, lambda 1):
    that model's dropped and rescaled task vector, with the mask its index and the seed give it in any merge."""
    out = run_merge({"method": "dare_linear", "base_model": str(zoo["base"]), "models": models, "seed": 11,
                     "rescale": rescale}, out)
    base = weights_of(zoo["base"])
    return {k: out[k] - base[k] for k in base}


def test_dare_drops_with_probability_one_minus_density_and_rescales_by_its_inverse(zoo, zero_delta_model, tmp_path):
    base, m1, m2 = (weights_of(zoo[k]) for k in ("base", "m1", "m2"))
    # density 0.3: rescaling by 1 / density (3.33) and by 1 / (1 - density) (1.43) differ
    first = [{"model": str(zoo["m1"]), "density": 0.3}, {"model": str(zero_delta_model), "density": 0.6}]
    second = [{"model": str(zero_delta_model), "density": 0.3}, {"model": str(zoo["m2"]), "density": 0.6}]
    dropped = [dropped_delta(zoo, first, tmp_path / "first"), dropped_delta(zoo, second, tmp_path / "second")]
    for d, m, density in ((dropped[0], m1, 0.3), (dropped[1], m2, 0.6)):
        kept = {k: v != 0 for k, v in d.items()}
        share = sum(int(v.sum()) for v in kept.values()) / sum(v.numel() for v in kept.values())
        assert abs(share - density) < 0.035, share  # 5712 entries: 5 sigma is 0.031 at 0.6
        for k in d:
            assert torch.allclose(d[k][kept[k]], (m[k] - base[k])[kept[k]] / density, atol=1e-6), k
    # rescale: norm scales the kept entries of a tensor by one factor, so that it keeps its L2 norm
    normed = dropped_delta(zoo, first, tmp_path / "normed", rescale="norm")
    for k in normed:
        task_vector = m1[k] - base[k]
        kept = task_vector * (dropped[0][k] != 0)
        assert torch.allclose(normed[k], kept * task_vector.norm() / kept.norm(), atol=1e-6), k
    # dare_linear and dare_ties of both models draw the same masks, then add up or elect signs as the papers say
    both = [{"model": str(zoo["m1"]), "weight": 1.0, "density": 0.3}, {"model": str(zoo["m2"]), "weight": 0.7}]
    spec = {"base_model": str(zoo["base"]), "models": both, "density": 0.6, "lambda": 0.9, "seed": 11}
    linear = run_merge({"method": "dare_linear", **spec}, tmp_path / "linear")
    ties = run_merge({"method": "dare_ties", **spec}, tmp_path / "ties")
    for k in base:
        assert torch.allclose(linear[k], base[k] + 0.9 * (dropped[0][k] + 0.7 * dropped[1][k]), atol=1e-6), k
        expected = base[k] + 0.9 * disjoint_mean([dropped[0][k], 0.7 * dropped[1][k]], [1.0, 0.7])
        assert torch.allclose(ties[k], expected.float(), atol=1e-6), k


def test_dare_is_reproducible_and_seed_dependent(zoo, tmp_path):
    spec = {"method": "dare_linear", "base_model": str(zoo["base"]), "models": [str(zoo["m1"]), str(zoo["m2"])]}
    tunesmith.merge(spec, tmp_path / "a", progress=False)
    tunesmith.merge(spec, tmp_path / "b", progress=False)
    tunesmith.merge({**spec, "seed": 1}, tmp_path / "c", progress=False)
    a, b, c = ((tmp_path / x / "model.safetensors").read_bytes() for x in "abc")
    assert a == b and a != c


def test_slerp_gradient_over_layers(zoo, tmp_path):
    m1, m2 = weights_of(zoo["m1"]), weights_of(zoo["m2"])
    out = run_merge({"method": "slerp", "models": [str(zoo["m1"]), str(zoo["m2"])], "t": [0.0, 1.0]}, tmp_path / "out")
    # two layers: layer 0 at t=0 (the first model), layer 1 at t=1; embeddings t=0; the final norm t=1
    for k in out:
        if "layers.0." in k or "embed_tokens" in k:
            assert torch.equal(out[k], m1[k]), k
        else:
            assert torch.equal(out[k], m2[k]), k
    out = run_merge({"method": "slerp", "models": [str(zoo["m1"]), str(zoo["m2"])], "t": 0.3}, tmp_path / "mid")
    for k in out:
        assert torch.allclose(out[k], slerp_formula(m1[k], m2[k], 0.3), atol=1e-5), k


# ---- the output folder -------------------------------------------------------------------------------------
def test_output_loads_alone_and_carries_config_tokenizer_template_and_spec(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    other = fine_tuned(tiny_model_dir, tmp_path / "ft", seed=5)
    out = tmp_path / "merged"
    tunesmith.merge({"method": "ties", "base_model": str(tiny_model_dir), "models": [str(other)]}, out, progress=False)
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tiny_model_dir / name).exists():
            assert (out / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name
    assert (out / "chat_template.jinja").exists() or "chat_template" in (out / "tokenizer_config.json").read_text()
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    logits = model(ids).logits
    assert torch.isfinite(logits).all()
    spec = yaml.safe_load((out / "merge_spec.yaml").read_text())
    assert spec["method"] == "ties" and spec["models"][0]["density"] == 0.5
    # the written spec reproduces the merge
    tunesmith.merge(load_merge_spec(out / "merge_spec.yaml"), tmp_path / "again", progress=False)
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_sharded_inputs_and_sharded_bf16_output(tmp_path):
    from transformers import AutoModelForCausalLM

    base = make_llama(tmp_path / "base", seed=0, hidden=32, max_shard_size="40KB")
    other = make_llama(tmp_path / "other", seed=1, hidden=32, max_shard_size="30KB")
    assert (base / INDEX_FILE).exists() and (other / INDEX_FILE).exists()
    out = tmp_path / "out"
    tunesmith.merge({"method": "linear", "models": [str(base), str(other)], "dtype": "bfloat16",
                     "max_shard_size": "20KB"}, out, progress=False)
    index = json.loads((out / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).exists() for s in shards)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    got = weights_of(out)
    a, b = weights_of(base), weights_of(other)
    assert set(got) == set(index["weight_map"]) == set(a)
    for k in got:
        assert got[k].dtype == torch.bfloat16
        assert torch.equal(got[k], ((a[k] + b[k]) / 2).to(torch.bfloat16)), k
    model = AutoModelForCausalLM.from_pretrained(out)
    assert next(model.parameters()).dtype == torch.bfloat16


# ---- adapters ------------------------------------------------------------------------------------------------
def test_adapter_task_vector_matches_peft_merge(zoo, tmp_path):
    for name in ("a1", "a2"):  # a2: rank 2 with rsLoRA scaling (alpha / sqrt(r)) on three modules
        reference = peft_merged(zoo["base"], zoo[name])
        out = run_merge({"method": "task_arithmetic", "base_model": str(zoo["base"]), "models": [str(zoo[name])]},
                        tmp_path / name)
        assert set(out) == set(reference)
        for k in out:
            assert torch.allclose(out[k], reference[k], atol=1e-5), (name, k)


def test_adapters_merge_like_their_merged_full_models(zoo, tmp_path):
    full = tmp_path / "full"
    for name in ("a1", "a2"):
        (full / name).mkdir(parents=True)
        save_file(peft_merged(zoo["base"], zoo[name]), full / name / "model.safetensors", metadata={"format": "pt"})
        shutil.copy(zoo["base"] / "config.json", full / name / "config.json")
    for method in ("ties", "dare_ties", "linear"):
        spec = {"method": method, "base_model": str(zoo["base"]), "seed": 3}
        from_adapters = run_merge({**spec, "models": [str(zoo["a1"]), str(zoo["a2"])]}, tmp_path / f"{method}-a")
        from_full = run_merge({**spec, "models": [str(full / "a1"), str(full / "a2")]}, tmp_path / f"{method}-f")
        for k in from_full:
            assert torch.allclose(from_adapters[k], from_full[k], atol=1e-5), (method, k)


def test_run_folder_counts_as_an_adapter_and_names_its_base(zoo, tmp_path):
    run = tmp_path / "runs" / "a1"
    shutil.copytree(zoo["a1"], run)
    (run / "config.yaml").write_text(yaml.safe_dump({"model": str(zoo["base"]), "data": {"train": "x.jsonl"}}))
    # linear without base_model: the run's base is used, and a single adapter of weight 1 is base + its delta
    out = run_merge({"method": "linear", "models": [str(run)]}, tmp_path / "out")
    reference = peft_merged(zoo["base"], zoo["a1"])
    assert all(torch.allclose(out[k], reference[k], atol=1e-5) for k in reference)
    assert (tmp_path / "out" / "config.json").read_text() == (zoo["base"] / "config.json").read_text()
    # a task-vector method still needs base_model spelled out
    with pytest.raises(TunesmithError, match="needs base_model"):
        tunesmith.merge({"method": "ties", "models": [str(run)]}, tmp_path / "x", progress=False)


# ---- errors: clear messages, nothing written ----------------------------------------------------------------------
def expect_error(spec: dict, tmp_path: Path, *needles: str) -> str:
    with pytest.raises(TunesmithError) as info:
        tunesmith.merge(spec, tmp_path / "out", progress=False)
    msg = str(info.value)
    for needle in needles:
        assert needle in msg, msg
    assert_nothing_written(tmp_path)
    return msg


def test_shape_mismatch_names_the_tensor(zoo, tmp_path):
    wide = make_llama(tmp_path / "wide", hidden=32)
    expect_error({"method": "linear", "models": [str(zoo["base"]), str(wide)]}, tmp_path,
                 "shape mismatch in tensor 'model.embed_tokens.weight'", "models[1]", "(64, 32)", "(64, 16)")


def test_architecture_mismatch_names_the_missing_tensor(zoo, tmp_path):
    deep = make_llama(tmp_path / "deep", layers=3)
    expect_error({"method": "ties", "base_model": str(zoo["base"]), "models": [str(deep)]}, tmp_path,
                 "architecture mismatch", "models[0]", "'model.layers.2.", "that the base")
    untied = make_llama(tmp_path / "untied", tie=False)
    expect_error({"method": "linear", "models": [str(zoo["base"]), str(untied)]}, tmp_path, "'lm_head.weight'")


def test_different_vocabulary_says_what_to_do(zoo, tmp_path):
    bigger = make_llama(tmp_path / "bigger", vocab=80)
    expect_error({"method": "task_arithmetic", "base_model": str(zoo["base"]), "models": [str(bigger)]}, tmp_path,
                 "different vocabulary sizes", "80", "64", "share one tokenizer", "resize_token_embeddings")
    # the same check from the tensor shapes when config.json does not say
    cfg = json.loads((bigger / "config.json").read_text())
    cfg.pop("vocab_size")
    (bigger / "config.json").write_text(json.dumps(cfg))
    expect_error({"method": "linear", "models": [str(zoo["base"]), str(bigger)]}, tmp_path,
                 "different vocabulary sizes", "'model.embed_tokens.weight'")


def test_adapter_of_another_base_is_refused(zoo, tmp_path):
    wide = make_llama(tmp_path / "wide", hidden=32)
    expect_error({"method": "ties", "base_model": str(wide), "models": [str(zoo["a1"])]}, tmp_path,
                 "models[0]", "shape mismatch in tensor 'model.layers.0.", "scale * B @ A")


def test_spec_errors_write_nothing(zoo, tmp_path):
    expect_error({"method": "slerp", "models": [str(zoo["m1"]), str(zoo["m2"]), str(zoo["m3"])]}, tmp_path,
                 "exactly two models, got 3")
    expect_error({"method": "ties", "models": [str(zoo["m1"])]}, tmp_path, "needs base_model")
    expect_error({"method": "linear", "models": [{"model": str(zoo["m1"]), "weight": 1},
                                                 {"model": str(zoo["m2"]), "weight": -1}]}, tmp_path, "sum to zero")
    expect_error({"method": "linear", "models": [str(tmp_path / "missing")]}, tmp_path, "models[0].model", "unknown model")
    expect_error({"method": "ties", "base_model": str(zoo["a1"]), "models": [str(zoo["m1"])]}, tmp_path,
                 "base_model", "is an adapter")


def test_failure_midway_leaves_no_folder(zoo, tmp_path, monkeypatch):
    from tunesmith.merging import run as run_module

    calls = {"n": 0}
    real = run_module.merge_tensor

    def flaky(plan, name):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("disk on fire")
        return real(plan, name)

    monkeypatch.setattr(run_module, "merge_tensor", flaky)
    with pytest.raises(RuntimeError, match="disk on fire"):
        tunesmith.merge({"method": "linear", "models": [str(zoo["m1"]), str(zoo["m2"])]}, tmp_path / "new" / "out",
                        progress=False)
    assert not (tmp_path / "new").exists()  # not even the parent this call created


def test_overwrite_rules(zoo, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    spec = {"method": "linear", "models": [str(zoo["m1"]), str(zoo["m2"])]}
    with pytest.raises(TunesmithError, match="exists and is not empty; pass --overwrite"):
        tunesmith.merge(spec, out, progress=False)
    assert (out / "keep.txt").exists()
    tunesmith.merge(spec, out, overwrite=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folders left
    with pytest.raises(TunesmithError) as exc:
        tunesmith.merge(spec, zoo["m1"], overwrite=True, progress=False)
    assert str(exc.value) == f"--out '{zoo['m1']}' is the input models[0] '{zoo['m1']}'; write to a new folder, such as merged/my-model"
    assert (zoo["m1"] / "model.safetensors").exists()


def test_untouched_tensors_come_from_the_base_exactly(zoo, tmp_path):
    base = weights_of(zoo["base"])
    out = run_merge({"method": "dare_ties", "base_model": str(zoo["base"]), "models": [str(zoo["a2"])]},
                    tmp_path / "out")
    for k in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.0.self_attn.k_proj.weight"):
        assert torch.equal(out[k], base[k]), k
    assert not torch.equal(out["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])


# ---- CLI ------------------------------------------------------------------------------------------------------------
def test_cli_merge_with_overrides_and_errors(zoo, tmp_path):
    from typer.testing import CliRunner

    from tunesmith.cli import app

    spec = tmp_path / "merge.yaml"
    spec.write_text(yaml.safe_dump({"method": "ties", "base_model": str(zoo["base"]),
                                    "models": [str(zoo["m1"]), str(zoo["m2"])]}))
    runner = CliRunner()
    res = runner.invoke(app, ["merge", str(spec), "--out", str(tmp_path / "out"), "--set", "lambda=0.5",
                              "--set", "models.1.weight=0.25"])
    assert res.exit_code == 0, res.output
    assert "merged into" in res.output and "AutoModelForCausalLM" in res.output
    written = yaml.safe_load((tmp_path / "out" / "merge_spec.yaml").read_text())
    assert written["lambda"] == 0.5 and written["models"][1]["weight"] == 0.25
    res = runner.invoke(app, ["merge", str(spec), "--out", str(tmp_path / "out2"), "--set", "t=0.5"])
    assert res.exit_code == 1 and "`t` is not a ties parameter" in res.output
    assert not (tmp_path / "out2").exists()


def test_adapter_training_a_tied_lm_head_is_refused(zoo, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(zoo["base"]),
                           LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"], task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path / "ad")
    expect_error({"method": "ties", "base_model": str(zoo["base"]), "models": [str(tmp_path / "ad")]}, tmp_path,
                 "'lm_head.weight'", "tie_word_embeddings", "not supported")


def test_dora_adapter_is_refused_with_the_fix(zoo, tmp_path):
    ad = tmp_path / "dora"
    shutil.copytree(zoo["a1"], ad)
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    expect_error({"method": "ties", "base_model": str(zoo["base"]), "models": [str(ad)]}, tmp_path,
                 "DoRA", "tunesmith export")
