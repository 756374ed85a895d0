"""Merging LoRA adapters of the real built-in model (SmolLM2-135M-Instruct): slow, still runs in CI.

Reference: PEFT itself. Task arithmetic of two adapters with weights 1 and lambda 1 is the base plus
both updates, which is what merging one adapter with merge_and_unload and then the other gives.
"""
from __future__ import annotations

import pytest
import torch

import tunesmith

pytestmark = pytest.mark.slow


def random_adapter(base_dir, out, seed: int, r: int, targets):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(out)
    return out


@pytest.fixture
def one_thread():
    """Hundreds of small element-wise ops (PEFT merges, comparisons) run faster on one thread here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_adapters_of_the_builtin_model_merge_like_peft(tmp_path, one_thread):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.models import resolve_model

    base_dir = resolve_model("smollm2-135m-instruct").path
    a = random_adapter(base_dir, tmp_path / "a", seed=1, r=8, targets="all-linear")
    b = random_adapter(base_dir, tmp_path / "b", seed=2, r=4, targets=["q_proj", "v_proj"])
    out = tmp_path / "merged"
    tunesmith.merge({"method": "task_arithmetic", "base_model": "smollm2-135m-instruct",
                     "models": [str(a), str(b)]}, out, progress=False)

    reference = AutoModelForCausalLM.from_pretrained(base_dir)
    for adapter in (a, b):
        reference = PeftModel.from_pretrained(reference, str(adapter)).merge_and_unload()
    merged = AutoModelForCausalLM.from_pretrained(out)
    ref_sd, got_sd = reference.state_dict(), merged.state_dict()
    worst = max((ref_sd[k] - got_sd[k]).abs().max().item() for k in ref_sd)
    assert worst < 1e-5

    tok = AutoTokenizer.from_pretrained(out)
    ids = tok.apply_chat_template([{"role": "user", "content": "Say hi."}], add_generation_prompt=True,
                                  return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, reference(ids).logits, atol=1e-3)
        # the adapters changed something: the merge is not the base
        base = AutoModelForCausalLM.from_pretrained(base_dir)
        assert not torch.allclose(merged(ids).logits, base(ids).logits, atol=1e-3)

    # every other method runs on the real shapes too (tied 49152 x 576 embeddings left as the base's)
    tunesmith.merge({"method": "dare_ties", "base_model": "smollm2-135m-instruct", "models": [str(a), str(b)],
                     "density": 0.3, "dtype": "bfloat16"}, tmp_path / "dare", progress=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dare")
    assert next(model.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits.float()).all()
