"""`tunesmith export RUN ... --vllm DIR`: adapters in the layout vLLM loads, serve.sh, the chat template.

vLLM cannot run on these CPUs, so the written files are checked against vLLM's adapter-loading rules as its
source states them (vllm-project/vllm): vllm/lora/peft_helper.py @ e745bafffc44744aa601169f8c6f325e47ca7cd5
(required keys r / lora_alpha / target_modules, no modules_to_save, no DoRA, rank <= max_lora_rank, bias none),
vllm/config/lora.py @ a78dc92f43ae2471dd40675a47079aa1a9a157c1 (--max-lora-rank in 1, 8, 16, 32, 64, 128, 256,
320, 512), vllm/lora/utils.py @ 0fd157078c53638b7ffc9ce7f2c8b8d7ef7a7d28 (tensor names `<module>.lora_A.weight` /
`.lora_B.weight` after `base_model.model.`), vllm/lora/lora_model.py @ 532cc2581840104cf00297b7ea6a187420456403
(adapter_model.safetensors; each module's last name a linear layer vLLM replaced). The rules are restated in this
file, apart from tunesmith's implementation; a GPU test runs vLLM itself where CUDA and vllm are present.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import shlex
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from helpers import fails, invoke, ok
from test_export_gguf import train_run

VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
LLAMA_LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def vllm_would_load(folder: Path, max_lora_rank: int) -> None:
    """vLLM's checks, restated from the files named in the module docstring; raises ValueError as vLLM does."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    missing = {"r", "lora_alpha", "target_modules"} - set(cfg)
    if missing:
        raise ValueError(f"Missing required configuration fields: {missing}")
    if cfg.get("modules_to_save"):
        raise ValueError("vLLM only supports modules_to_save being None.")
    if cfg.get("use_dora"):
        raise ValueError("vLLM does not yet support DoRA.")
    if cfg["r"] > max_lora_rank:
        raise ValueError(f"LoRA rank {cfg['r']} is greater than max_lora_rank {max_lora_rank}.")
    if cfg.get("bias", "none") != "none":
        raise ValueError("Adapter bias is not supported.")
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as f:
        for name in f.keys():
            parts = name.removeprefix("base_model.model.").split(".")
            if parts[-1] != "weight" or parts[-2] not in ("lora_A", "lora_B"):
                raise ValueError(f"{name} is unsupported LoRA weight")
            if parts[-3] not in LLAMA_LINEARS:
                raise ValueError(f"expected target modules in {LLAMA_LINEARS} but received {parts[-3]}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    a = train_run(tmp_path_factory.mktemp("vllm-a"), str(tiny_model_dir), system_prompt="Answer with JSON only.")
    b = train_run(tmp_path_factory.mktemp("vllm-b"), str(tiny_model_dir), system_prompt="Answer with JSON only.")
    return a, b


def serve_args(script: str) -> list[str]:
    """The `vllm serve` command line in serve.sh, with $HERE left as written."""
    command = script[script.index("exec vllm serve"):].replace("\\\n", " ")
    return shlex.split(command.replace('"$HERE', '"HERE'))[1:]


def test_two_runs_one_server(runs, tmp_path, tiny_model_dir):
    from tunesmith.exporting.vllm import export_vllm

    a, b = runs
    out = export_vllm([f"booking={a}", f"other={b}"], str(tmp_path / "v"))
    for name in ("booking", "other"):
        folder = out / "adapters" / name
        assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
        vllm_would_load(folder, max_lora_rank=16)
    args = serve_args((out / "serve.sh").read_text())
    assert args[:3] == ["vllm", "serve", str(tiny_model_dir.resolve())]
    assert "--enable-lora" in args
    i = args.index("--lora-modules")
    assert args[i + 1:i + 3] == ["booking=HERE/adapters/booking", "other=HERE/adapters/other"]
    assert args[args.index("--max-lora-rank") + 1] == "8"  # r = 4, rounded up to a value vLLM accepts
    assert int(args[args.index("--max-lora-rank") + 1]) in VLLM_MAX_LORA_RANKS
    assert args[args.index("--max-loras") + 1] == "2"
    assert args[args.index("--chat-template") + 1] == "HERE/chat_template.jinja"
    assert (out / "serve.sh").stat().st_mode & 0o111


def test_chat_template_carries_the_system_prompt(runs, tmp_path, tokenizer):
    """The template file renders, in transformers, what the training data rendered: the system prompt included."""
    from tunesmith.exporting.vllm import export_vllm

    out = export_vllm([str(runs[0])], str(tmp_path / "v"))
    template = (out / "chat_template.jinja").read_text()
    convo = [{"role": "user", "content": "Hi"}]
    want = tokenizer.apply_chat_template([{"role": "system", "content": "Answer with JSON only."}, *convo],
                                         tokenize=False, add_generation_prompt=True)
    assert tokenizer.apply_chat_template(convo, chat_template=template, tokenize=False,
                                         add_generation_prompt=True) == want
    own = [{"role": "system", "content": "Other."}, *convo]
    assert tokenizer.apply_chat_template(own, chat_template=template, tokenize=False, add_generation_prompt=True) == \
        tokenizer.apply_chat_template(own, tokenize=False, add_generation_prompt=True)


def test_serve_sh_is_valid_bash(runs, tmp_path):
    import subprocess

    from tunesmith.exporting.vllm import export_vllm

    out = export_vllm([str(runs[0])], str(tmp_path / "v"))
    subprocess.run(["bash", "-n", str(out / "serve.sh")], check=True)


def test_max_lora_rank_rounds_up_to_vllms_values():
    from tunesmith.exporting.vllm import max_lora_rank

    assert [max_lora_rank(r) for r in (1, 2, 8, 9, 16, 100, 300, 320, 321, 512)] == \
        [1, 8, 8, 16, 16, 128, 320, 320, 512, 512]


def _variant(run: Path, tmp: Path, config: dict | None = None, tensors: dict | None = None) -> Path:
    """A copy of `run` with adapter_config keys changed and tensors renamed or added."""
    from safetensors.torch import load_file, save_file

    copy = tmp / "variant"
    shutil.copytree(run, copy)
    cfg = json.loads((copy / "adapter_config.json").read_text())
    cfg.update(config or {})
    (copy / "adapter_config.json").write_text(json.dumps(cfg))
    if tensors:
        weights = load_file(copy / "adapter_model.safetensors")
        weights.update(tensors)
        save_file(weights, copy / "adapter_model.safetensors")
    return copy


@pytest.mark.parametrize("config, tensors, message, pinned_vllm_refuses", [
    ({"use_dora": True}, None, "it is a DoRA adapter", True),
    ({"peft_type": "VERA", "lora_alpha": None}, None, "trains a VERA adapter, not LoRA", False),
    ({"peft_type": "ADALORA"}, {"base_model.model.model.layers.0.self_attn.q_proj.lora_E": torch.zeros(4, 1)},
     "trains a ADALORA adapter, not LoRA", True),
    ({"modules_to_save": ["lm_head"]}, None, "modules_to_save ['lm_head']", True),
    ({"bias": "lora_only"}, None, "its adapter trains biases", True),
    ({"r": 1024}, None, "its rank 1024 is above vLLM's largest --max-lora-rank 512", True),
    ({"rank_pattern": {"q_proj": 2}}, None, "uneven ranks [2, 4] (rank_pattern)", False),
    ({"init_lora_weights": "pissa"}, None, "its init 'pissa' changes the base weights", False),
    (None, {"base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64)}, "the adapter adapts 'lm_head'", True),
    (None, {"base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.zeros(64)},
     "not a lora_A/lora_B weight", True),
])
def test_refuses_what_vllm_cannot_serve_and_says_merge(config, tensors, message, pinned_vllm_refuses, runs, tmp_path):
    """Each refusal is one line naming the reason and `--merge`, and touches nothing. Where the pinned vLLM refuses
    the adapter too, the restated rules agree; the others are refused by vLLM main's peft_helper.py (rank_pattern
    ranks count for the max, base-changing inits) or, for VeRA, by PEFT's own config (no lora_alpha: vLLM's required
    field missing)."""
    variant = _variant(runs[0], tmp_path, config, tensors)
    if pinned_vllm_refuses:
        with pytest.raises(ValueError):
            vllm_would_load(variant, max_lora_rank=512)
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in variant.rglob("*") if p.is_file()}
    err = fails(invoke("export", variant, "--vllm", tmp_path / "v"), message, "export --merge")
    assert str(variant) in err
    assert not (tmp_path / "v").exists()
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in variant.rglob("*") if p.is_file()} == before


def test_refuses_a_whole_model_run(runs, tmp_path):
    variant = _variant(runs[0], tmp_path)
    (variant / "adapter_config.json").unlink()
    (variant / "config.json").write_text("{}")
    fails(invoke("export", variant, "--vllm", tmp_path / "v"), "holds a whole model (method.name=lora)",
          "export --merge")


def test_cli_bad_inputs(runs, tmp_path):
    a, b = runs
    fails(invoke("export", a, b, "--out", tmp_path / "o"), "several only with --vllm")
    fails(invoke("export", a, "--vllm", tmp_path / "v", "--out", tmp_path / "o"), "leave out --out")
    fails(invoke("export", tmp_path, "--vllm", tmp_path / "v"), "is not a trained run folder")
    fails(invoke("export", a, a, "--vllm", tmp_path / "v"), "two runs are both named 'run'")
    fails(invoke("export", f"bad name={a}", "--vllm", tmp_path / "v"), "adapter name 'bad name'")
    assert not (tmp_path / "v").exists() and not (tmp_path / "o").exists()


def test_runs_on_different_bases_are_refused(runs, tmp_path, tiny_model_dir):
    other_base = tmp_path / "other-base"
    shutil.copytree(tiny_model_dir, other_base)
    variant = _variant(runs[1], tmp_path)
    cfg = yaml.safe_load((variant / "config.yaml").read_text())
    cfg["model"] = str(other_base)
    (variant / "config.yaml").write_text(yaml.safe_dump(cfg))
    fails(invoke("export", runs[0], variant, "--vllm", tmp_path / "v"), "one vLLM server serves adapters of one base")


@pytest.mark.parametrize("where", ["run", "inside-run", "base", "holds-run"])
def test_refuses_a_dir_that_is_holds_or_lies_in_an_input(where, runs, tiny_model_dir, tmp_path):
    run = runs[0]
    target = {"run": run, "inside-run": run / "vllm", "base": tiny_model_dir, "holds-run": run.parent}[where]
    before = {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for r in (run, tiny_model_dir)
              for p in r.rglob("*") if p.is_file()}
    fails(invoke("export", run, "--vllm", target, "--overwrite"), "--vllm")
    after = {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for r in (run, tiny_model_dir)
             for p in r.rglob("*") if p.is_file()}
    assert after == before


def test_cli_writes_and_leaves_inputs_alone(runs, tmp_path, tiny_model_dir):
    a, _ = runs
    before = {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for r in (a, tiny_model_dir)
              for p in r.rglob("*") if p.is_file()}
    out = ok(invoke("export", a, "--vllm", tmp_path / "v"))
    assert "serve.sh" in out
    assert (tmp_path / "v" / "adapters" / "run" / "adapter_model.safetensors").read_bytes() == \
        (a / "adapter_model.safetensors").read_bytes()
    after = {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for r in (a, tiny_model_dir)
             for p in r.rglob("*") if p.is_file()}
    assert after == before


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("vllm") is None,
                    reason="needs a CUDA GPU and vllm installed")
def test_vllm_serves_the_export(runs, tmp_path):
    """vLLM itself loads the exported adapter (LLM(enable_lora=True) + LoRARequest) and generates with it."""
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from tunesmith.exporting.vllm import export_vllm

    out = export_vllm([f"booking={runs[0]}"], str(tmp_path / "v"))
    args = serve_args((out / "serve.sh").read_text())
    llm = LLM(model=args[2], enable_lora=True, max_lora_rank=int(args[args.index("--max-lora-rank") + 1]),
              max_model_len=256, gpu_memory_utilization=0.3, enforce_eager=True)
    result = llm.generate(["Hello"], SamplingParams(max_tokens=4, temperature=0.0),
                          lora_request=LoRARequest("booking", 1, str(out / "adapters" / "booking")))
    assert result[0].outputs[0].token_ids
