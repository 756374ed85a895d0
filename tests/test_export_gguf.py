"""`tunesmith export RUN --format gguf`: one .gguf + an Ollama Modelfile, checked with readers nobody here wrote.

- transformers' GGUF loader (`from_pretrained(dir, gguf_file=...)`, model and tokenizer) reads the file back; its
  logits equal PEFT's own merge of the run (merge_and_unload) with the weights rounded as the file stores them
  (f16: rounded to float16 in plain torch, 1e-4), and stay within a stated bound for q8_0.
- gguf's GGUFReader reads the names, types and metadata, compared with llama.cpp's names written out by hand.
- llama-cpp-python, when installed (the `gguf-check` extra), generates the same greedy answers as transformers.
The tiny run is trained two steps, then its lora_B set to random values, so a dropped adapter shows in the logits.
"""
from __future__ import annotations

import hashlib
import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from tunesmith.config import load_config
from tunesmith.errors import TunesmithError
from helpers import fails, invoke, ok, write_jsonl

IM_END = "<|im_end|>"
CHATML_TEMPLATE = ('{{ range .Messages }}{{ if eq .Role "system" }}<|im_start|>system\n{{ .Content }}<|im_end|>\n'
                   '{{ else if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n'
                   '{{ else if eq .Role "assistant" }}<|im_start|>assistant\n{{ .Content }}<|im_end|>\n'
                   '{{ end }}{{ end }}<|im_start|>assistant\n')


def train_run(tmp: Path, model: str, system_prompt: str | None = None, max_length: int = 256) -> Path:
    from tunesmith.demo.booking import generate
    from tunesmith.training.run import train

    rows, held_out = generate(n_train=8, n_eval=4, seed=1)
    write_jsonl(tmp / "train.jsonl", rows)
    write_jsonl(tmp / "eval.jsonl", held_out)
    recipe = {
        "model": model,
        "data": {"train": str(tmp / "train.jsonl"), "eval": str(tmp / "eval.jsonl"), "max_length": max_length,
                 **({"system_prompt": system_prompt} if system_prompt else {})},
        "method": {"name": "lora", "r": 4, "alpha": 8},
        "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-3, "logging_steps": 1, "save_steps": 100, "bf16": False},
        "eval": {"scorer": "json_match", "max_new_tokens": 6, "batch_size": 4, "limit": 2},
        "output_dir": str(tmp / "run"),
    }
    (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    run = train(load_config(tmp / "recipe.yaml"), progress=False).output_dir
    weights = load_file(run / "adapter_model.safetensors")
    gen = torch.Generator().manual_seed(0)
    for k in weights:
        if "lora_B" in k:
            weights[k] = torch.randn(weights[k].shape, generator=gen) * 0.2
    save_file(weights, run / "adapter_model.safetensors", metadata={"format": "pt"})
    return run


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir):
    return train_run(tmp_path_factory.mktemp("gguf"), str(tiny_model_dir), system_prompt="Answer with JSON only.")


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    """quant -> the exported .gguf, each written once for the module."""
    from tunesmith.exporting.gguf import export_gguf

    root = tmp_path_factory.mktemp("gguf-out")
    return {q: export_gguf(str(run), str(root / q), quant=q) for q in ("f16", "q8_0", "q4_0")}


def peft_merged(base_dir, run_dir):
    """The reference: PEFT's own merge of the run's adapter into the base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(run_dir)).merge_and_unload().eval()


def probe(tokenizer, text="Book a table in Paris for 2."):
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return tokenizer(rendered, return_tensors="pt", add_special_tokens=False)["input_ids"]


def gguf_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


# --- pure parts ----------------------------------------------------------------------------------


def test_rope_permutation_is_llama_cpps_interleaving_and_transformers_undoes_it():
    """One head of 4 rows [a0, a1, b0, b1] (HF: first half, second half) becomes [a0, b0, a1, b1]; transformers'
    GGUF loader's reverse permutation gives back the original, for query heads and for GQA's fewer key heads."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from tunesmith.exporting.gguf import permute_for_rope

    one_head = np.array([[10.0], [11.0], [20.0], [21.0]])
    assert permute_for_rope(one_head, 1)[:, 0].tolist() == [10.0, 20.0, 11.0, 21.0]
    q = np.random.default_rng(0).standard_normal((4 * 16, 64))
    k = np.random.default_rng(1).standard_normal((2 * 16, 64))
    processor = LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 2})
    assert np.array_equal(processor.process(permute_for_rope(q, 4), "blk.0.attn_q.weight").weights, q)
    assert np.array_equal(processor.process(permute_for_rope(k, 2), "blk.0.attn_k.weight").weights, k)


def test_pre_tokenizer_names_follow_llama_cpps_splits():
    from tunesmith.exporting.gguf import LLAMA3_SPLIT, pre_tokenizer_name

    bpe = {"model": {"type": "BPE"}, "decoder": {"type": "ByteLevel"}}
    assert pre_tokenizer_name({**bpe, "pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}) == "gpt-2"
    digits = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                    {"type": "ByteLevel", "use_regex": True}]}
    assert pre_tokenizer_name({**bpe, "pre_tokenizer": digits}) == "smollm"
    llama3 = {"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}},
                                                    {"type": "ByteLevel", "use_regex": False}]}
    assert pre_tokenizer_name({**bpe, "pre_tokenizer": llama3}) == "llama-bpe"
    with pytest.raises(TunesmithError, match="pre-tokenizer \\(Whitespace\\)"):
        pre_tokenizer_name({**bpe, "pre_tokenizer": {"type": "Whitespace"}})
    with pytest.raises(TunesmithError, match="byte-level BPE tokenizers \\(GPT-2 style\\); this one is Unigram"):
        pre_tokenizer_name({"model": {"type": "Unigram"}, "decoder": {"type": "Metaspace"}})


def test_other_architectures_are_refused_by_name():
    from transformers import LlamaConfig, Qwen2Config

    from tunesmith.exporting.gguf import check_architecture

    with pytest.raises(TunesmithError) as exc:
        check_architecture(Qwen2Config(architectures=["Qwen2ForCausalLM"]))
    assert str(exc.value).startswith("--format gguf writes the Llama family (model_type llama); this run's model is "
                                     "'qwen2' (Qwen2ForCausalLM): export --merge")
    with pytest.raises(TunesmithError, match="RoPE scaling 'llama3'"):
        check_architecture(LlamaConfig(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                        "original_max_position_embeddings": 8192}))
    with pytest.raises(TunesmithError, match="attention_bias=true"):
        check_architecture(LlamaConfig(attention_bias=True))


# --- the tiny run, written and read back --------------------------------------------------------


@pytest.mark.slow
def test_transformers_reads_the_f16_file_with_the_merged_models_logits(run, exported, tiny_model_dir, tokenizer):
    """f16 stores each weight rounded to float16: the reference is PEFT's merge with exactly that rounding, in plain
    torch (norms stay f32, as llama.cpp writes them), so the only freedom left is float summation order."""
    want_model = peft_merged(tiny_model_dir, run)
    ids = probe(tokenizer)
    with torch.no_grad():
        exact = want_model(input_ids=ids).logits
        for _, p in want_model.named_parameters():
            if p.ndim == 2:
                p.copy_(p.half().float())
        want = want_model(input_ids=ids).logits
        got = gguf_model(exported["f16"])(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert (got - exact).abs().max() > 0  # the rounding is real: the comparison above is against the rounded model


@pytest.mark.slow
def test_q8_0_and_q4_0_stay_within_their_quantization_bound(run, exported, tiny_model_dir, tokenizer):
    """Q8_0 stores blocks of 32 as int8 times a scale max|w|/127: each weight moves by at most half a step, under
    0.4% of its block's largest weight; Q4_0 has 16 levels, a step 8x as coarse. Bound stated for this tiny random
    model (its logits span only about 1.6): q8_0 within 5% of the logits' range (measured 2.6%), q4_0 within 50%,
    and q8_0 at most half as far off as q4_0."""
    ids = probe(tokenizer)
    with torch.no_grad():
        want = peft_merged(tiny_model_dir, run)(input_ids=ids).logits
        q8 = gguf_model(exported["q8_0"])(input_ids=ids).logits
        q4 = gguf_model(exported["q4_0"])(input_ids=ids).logits
    spread = (want.max() - want.min()).item()
    q8_err, q4_err = (q8 - want).abs().max().item(), (q4 - want).abs().max().item()
    assert q8_err < 0.05 * spread
    assert q4_err < 0.5 * spread
    assert q8_err < q4_err / 2


@pytest.mark.slow
def test_transformers_builds_the_same_tokenizer_and_template(exported, run, tokenizer):
    from transformers import AutoTokenizer

    path = exported["f16"]
    read = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    text = "Reservation for 12 guests in São Paulo on 2024-11-11 <|im_end|>\n{\"a\": 1}"
    assert read(text, add_special_tokens=False)["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert read(text)["input_ids"] == tokenizer(text)["input_ids"]  # no BOS added by either
    convo = [{"role": "user", "content": "Hi"}]
    # The run's system prompt travels inside the template, as the training data had it.
    want = tokenizer.apply_chat_template([{"role": "system", "content": "Answer with JSON only."}, *convo],
                                         tokenize=False, add_generation_prompt=True)
    assert read.apply_chat_template(convo, tokenize=False, add_generation_prompt=True) == want
    assert read.convert_ids_to_tokens(read.eos_token_id) == IM_END


@pytest.mark.slow
def test_metadata_names_and_types_as_llama_cpp_reads_them(exported, tokenizer):
    from gguf import GGUFReader

    names = {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{part}.weight" for i in range(2) for part in
        ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}
    expected = {  # (a matrix, the tied output matrix token_embd, a norm) per quant
        "f16": ("F16", "F16", "F32"), "q8_0": ("Q8_0", "Q8_0", "F32"), "q4_0": ("Q4_0", "Q8_0", "F32")}
    for quant, (matrix, embd, norm) in expected.items():
        reader = GGUFReader(exported[quant])
        types = {t.name: t.tensor_type.name for t in reader.tensors}
        assert set(types) == names  # tied embeddings: no output.weight, as llama.cpp expects
        assert (types["blk.1.ffn_down.weight"], types["token_embd.weight"], types["blk.0.attn_norm.weight"]) == \
            (matrix, embd, norm)
        field = {k: f.contents() for k, f in reader.fields.items() if k not in ("tokenizer.ggml.tokens",
                                                                                "tokenizer.ggml.merges",
                                                                                "tokenizer.ggml.token_type")}
        assert field["general.architecture"] == "llama"
        assert field["general.file_type"] == {"f16": 1, "q8_0": 7, "q4_0": 2}[quant]  # llama.cpp's LLAMA_FTYPE_*
        assert (field["llama.block_count"], field["llama.embedding_length"], field["llama.attention.head_count"],
                field["llama.attention.head_count_kv"], field["llama.rope.dimension_count"]) == (2, 64, 4, 2, 16)
        assert field["tokenizer.ggml.model"] == "gpt2" and field["tokenizer.ggml.pre"] == "gpt-2"
        vocab = tokenizer.get_vocab()
        assert field["tokenizer.ggml.eos_token_id"] == vocab[IM_END] == field["tokenizer.ggml.eot_token_id"]
        assert field["tokenizer.ggml.bos_token_id"] == vocab["<|im_start|>"]
        assert field["tokenizer.ggml.add_bos_token"] is False
        assert "Answer with JSON only." in field["tokenizer.chat_template"]
    reader = GGUFReader(exported["f16"])
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    token_types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert tokens[vocab["Ġthe"]] == "Ġthe" and token_types[vocab["Ġthe"]] == 1  # NORMAL
    assert token_types[vocab[IM_END]] == 3  # CONTROL
    assert reader.fields["tokenizer.ggml.merges"].contents()[0] == "Ġ t"


@pytest.mark.slow
def test_modelfile_for_the_chatml_run(exported):
    """Written out by hand for ChatML: Go template per role, stop at <|im_end|>, the run's system prompt."""
    text = (exported["q8_0"].parent / "Modelfile").read_text()
    assert text.splitlines()[1:] == [
        f"FROM ./{exported['q8_0'].name}",
        *f'TEMPLATE """{CHATML_TEMPLATE}"""'.splitlines(),
        'PARAMETER stop "<|im_end|>"',
        "PARAMETER temperature 0",
        'SYSTEM """Answer with JSON only."""',
    ]
    assert exported["q8_0"].name == "run-q8_0.gguf"


def test_role_pieces_take_the_templates_own_default_system_prompt(tokenizer):
    from tunesmith.exporting.template import role_pieces

    pieces = role_pieces(tokenizer)
    assert pieces.default_system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert pieces.wrappers["user"] == ("<|im_start|>user\n", "<|im_end|>\n")
    assert pieces.generation_prompt == "<|im_start|>assistant\n"


# --- bad inputs and safety -----------------------------------------------------------------------


def test_cli_bad_inputs_are_one_line(run, tmp_path):
    fails(invoke("export", run, "--format", "gguf", "--quant", "q5_k", "--out", tmp_path / "o"),
          "--quant q5_k: unknown; choose one of f16, bf16, q8_0, q4_0")
    fails(invoke("export", run, "--format", "ggml", "--out", tmp_path / "o"), "--format ggml: unknown")
    fails(invoke("export", run, "--quant", "q8_0", "--out", tmp_path / "o"), "--quant applies to --format gguf")
    fails(invoke("export", tmp_path, "--format", "gguf", "--out", tmp_path / "o"), "is not a trained run folder")
    fails(invoke("export", run, "--format", "gguf"), "export needs --out DIR")
    assert not (tmp_path / "o").exists()


def test_cli_refuses_a_non_llama_base_in_one_line(run, tmp_path, tiny_model_dir):
    base = tmp_path / "qwen"
    base.mkdir()
    (base / "config.json").write_text(
        '{"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 64, "num_attention_heads": 4}')
    fake = tmp_path / "run"
    shutil.copytree(run, fake)
    cfg = yaml.safe_load((fake / "config.yaml").read_text())
    cfg["model"] = str(base)
    (fake / "config.yaml").write_text(yaml.safe_dump(cfg))
    fails(invoke("export", fake, "--format", "gguf", "--out", tmp_path / "o"),
          "this run's model is 'qwen2' (Qwen2ForCausalLM)")
    assert not (tmp_path / "o").exists()


def _hashes(*roots: Path) -> dict:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for r in roots for p in sorted(r.rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize("where", ["run", "inside-run", "base"])
def test_refuses_an_out_that_is_or_lies_in_an_input_and_touches_nothing(where, run, tiny_model_dir, tmp_path):
    target = {"run": run, "inside-run": run / "gguf", "base": tiny_model_dir}[where]
    before = _hashes(run, tiny_model_dir)
    fails(invoke("export", run, "--format", "gguf", "--out", target, "--overwrite"), "--out")
    assert _hashes(run, tiny_model_dir) == before
    assert not (run / "gguf").exists()


@pytest.mark.slow
def test_cli_writes_the_file_and_leaves_the_inputs_alone(run, tiny_model_dir, tmp_path):
    before = _hashes(run, tiny_model_dir)
    out = ok(invoke("export", run, "--format", "gguf", "--quant", "bf16", "--out", tmp_path / "g"))
    assert "run-bf16.gguf" in out and "ollama create" in out
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["Modelfile", "run-bf16.gguf"]
    assert _hashes(run, tiny_model_dir) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary sibling left


# --- the built-in model (slow) -------------------------------------------------------------------


@pytest.fixture(scope="module")
def builtin_export(tmp_path_factory):
    """A run on the built-in model (2 steps, random lora_B) exported as f16 and q8_0, with its held-out prompts."""
    from tunesmith.data.assemble import eval_conversations
    from tunesmith.exporting.gguf import export_gguf
    from tunesmith.models import pull_builtin

    pull_builtin("smollm2-135m-instruct")
    tmp = tmp_path_factory.mktemp("builtin-gguf")
    run = train_run(tmp, "smollm2-135m-instruct", max_length=160)
    files = {q: export_gguf(str(run), str(tmp / q), quant=q) for q in ("f16", "q8_0")}
    config = load_config(run / "config.yaml")
    prompts = [conv[:-1] for conv, _ in eval_conversations(config)[:4]]
    return run, files, prompts


def greedy_transformers(model, tokenizer, conversations, max_new_tokens=24) -> list[str]:
    from tunesmith.inference import generate_batch

    prompts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    return [generate_batch(model, tokenizer, [p], max_new_tokens)[0] for p in prompts]


@pytest.mark.slow
def test_builtin_model_round_trip_logits_and_greedy_answers(builtin_export, tokenizer):
    """The real model: f16 logits equal PEFT's merge rounded to f16 (1e-3 over 30 layers); q8_0 logits within 3% of
    their range (measured 0.5%), and the same greedy answers on the demo's held-out prompts."""
    from tunesmith.models import builtin_cache_dir

    run, files, prompts = builtin_export
    reference = peft_merged(builtin_cache_dir("smollm2-135m-instruct"), run)
    ids = probe(tokenizer)
    with torch.no_grad():
        want = reference(input_ids=ids).logits
        q8 = gguf_model(files["q8_0"])
        assert ((q8(input_ids=ids).logits - want).abs().max() < 0.03 * (want.max() - want.min())).item()
        for _, p in reference.named_parameters():
            if p.ndim == 2:
                p.copy_(p.half().float())
        f16 = gguf_model(files["f16"])
        torch.testing.assert_close(f16(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-3, rtol=0)
    answers = greedy_transformers(reference, tokenizer, prompts)
    assert all(answers)
    assert greedy_transformers(q8, tokenizer, prompts) == answers


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python is not installed (pip install 'tunesmith[gguf-check]')")
def test_llama_cpp_answers_like_transformers(builtin_export, tokenizer):
    """llama.cpp itself loads the file, renders the prompt with the file's own chat template and stops at the
    end-of-turn token: its greedy answers to the demo prompts equal transformers' on the same file."""
    from llama_cpp import Llama

    _, files, prompts = builtin_export
    want = greedy_transformers(gguf_model(files["f16"]), tokenizer, prompts)
    llm = Llama(model_path=str(files["f16"]), n_ctx=512, n_threads=2, verbose=False, seed=0)
    got = []
    for conv in prompts:
        reply = llm.create_chat_completion(messages=conv, max_tokens=24, temperature=0.0, top_k=1)
        got.append(reply["choices"][0]["message"]["content"].strip())
    assert got == want
