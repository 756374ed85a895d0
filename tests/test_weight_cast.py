"""Loading a checkpoint in another dtype: load_model equals from_pretrained(dtype=...) and lets go of the file's pages."""
from __future__ import annotations

import pytest
import torch
from transformers import (AutoModelForCausalLM, GemmaConfig, GPT2Config, LlamaConfig, LlamaForCausalLM, Qwen2Config)

from tunesmith.models import load_model
from tunesmith.weight_cast import cast_parameters, file_mapped_ranges

CONFIGS = {
    "llama": LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2": Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "gemma": GemmaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, head_dim=16),
    "gpt2": GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128),
}


def saved(tmp_path, name: str, stored) -> str:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[name]).to(stored)
    model.save_pretrained(tmp_path / name)
    return str(tmp_path / name)


def assert_same_model(mine, reference):
    for what in ("named_parameters", "named_buffers"):
        a, b = dict(getattr(mine, what)()), dict(getattr(reference, what)())
        assert a.keys() == b.keys(), what
        for key in a:
            assert a[key].dtype == b[key].dtype, (what, key, a[key].dtype, b[key].dtype)
            assert torch.equal(a[key], b[key]), (what, key)
    assert mine.config.to_dict() == reference.config.to_dict()
    if mine.config.tie_word_embeddings:
        assert mine.get_output_embeddings().weight is mine.get_input_embeddings().weight


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("stored,wanted", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                           (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)])
def test_load_model_equals_from_pretrained_in_that_dtype(tmp_path, name, stored, wanted):
    folder = saved(tmp_path, name, stored)
    assert_same_model(load_model(folder, dtype=wanted), AutoModelForCausalLM.from_pretrained(folder, dtype=wanted))


def test_modules_kept_in_fp32_follow_the_library(tmp_path, monkeypatch):
    """A model that keeps some modules in fp32 at bf16 is left to transformers' loader, which knows which."""
    monkeypatch.setattr(LlamaForCausalLM, "_keep_in_fp32_modules_strict", ["down_proj"])
    folder = saved(tmp_path, "llama", torch.float32)
    mine = load_model(folder, dtype=torch.bfloat16)
    assert mine.model.layers[0].mlp.down_proj.weight.dtype == torch.float32
    assert_same_model(mine, AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16))


def resident_mib_of(path_suffix: str) -> float:
    """Resident MiB of this process's maps of files ending with `path_suffix` (from /proc/self/smaps)."""
    total, counting = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields[0]) > 8 and ":" not in fields[0]:
                counting = len(fields) >= 6 and fields[-1].endswith(path_suffix)
            elif counting and fields[0] == "Rss:":
                total += int(fields[1])
    return total / 1024


def test_cast_releases_the_file_pages_a_plain_cast_keeps(tmp_path):
    """The point of casting one tensor at a time: by the end of it (almost) none of the ~17 MiB checkpoint is
    resident; the same cast without releasing has all of it resident until the map goes. One source tensor is
    kept alive in both so that the map is still there to look at."""
    config = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "m")
    file_mib = (tmp_path / "m" / "model.safetensors").stat().st_size / 2**20

    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype="auto")
    assert file_mapped_ranges(), "the checkpoint is memory-mapped"
    source = next(plain.parameters()).data
    for p in plain.parameters():
        p.data = p.data.to(torch.bfloat16)
    assert resident_mib_of("m/model.safetensors") > 0.9 * file_mib
    del plain, source

    lean = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype="auto")
    source = next(lean.parameters()).data
    cast_parameters(lean, torch.bfloat16)
    assert resident_mib_of("m/model.safetensors") < 0.05 * file_mib
    del source
    assert_same_model(lean, AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.bfloat16))
