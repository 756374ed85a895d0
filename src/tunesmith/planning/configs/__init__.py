"""Architecture numbers of popular models, written as the `config.json` keys the bill reads.

Only the numbers that decide memory are kept (sizes, counts, tying, biases, the model type); they are
copied from each model's published config.json. `tunesmith plan --model NAME` accepts these names
(case-insensitive) as well as built-in models, local folders and `config.json` files.
"""
from __future__ import annotations

from typing import Any

from ...models import BUILTIN_MODELS


def _decoder(model_type, hidden, inter, layers, heads, kv, vocab, tied) -> dict[str, Any]:
    return {
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
    }


def _llama(hidden, inter, layers, heads, kv, vocab, tied, head_dim=None, **extra) -> dict[str, Any]:
    cfg = {**_decoder("llama", hidden, inter, layers, heads, kv, vocab, tied), "attention_bias": False, "mlp_bias": False}
    if head_dim is not None:
        cfg["head_dim"] = head_dim
    cfg.update(extra)
    return cfg


def _qwen2(hidden, inter, layers, heads, kv, vocab, tied) -> dict[str, Any]:
    # Qwen2/2.5: bias on q, k and v (not on o); SwiGLU MLP; untied except the small ones.
    return _decoder("qwen2", hidden, inter, layers, heads, kv, vocab, tied)


def _gemma2(hidden, inter, layers, heads, kv, vocab) -> dict[str, Any]:
    # Gemma 2: head_dim 256, four RMSNorms per layer, tied embeddings, tanh soft-capping of the
    # attention scores (50) and the final logits (30), which is why it runs eager attention.
    return {**_decoder("gemma2", hidden, inter, layers, heads, kv, vocab, True), "head_dim": 256,
            "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}


BUNDLED: dict[str, dict[str, Any]] = {
    # Meta Llama 3.x
    "llama-3.1-8b": _llama(4096, 14336, 32, 32, 8, 128256, False),
    "llama-3.1-70b": _llama(8192, 28672, 80, 64, 8, 128256, False),
    "llama-3.2-1b": _llama(2048, 8192, 16, 32, 8, 128256, True, head_dim=64),
    "llama-3.2-3b": _llama(3072, 8192, 28, 24, 8, 128256, True, head_dim=128),
    # Qwen 2.5
    "qwen2.5-0.5b": _qwen2(896, 4864, 24, 14, 2, 151936, True),
    "qwen2.5-7b": _qwen2(3584, 18944, 28, 28, 4, 152064, False),
    "qwen2.5-14b": _qwen2(5120, 13824, 48, 40, 8, 152064, False),
    "qwen2.5-72b": _qwen2(8192, 29568, 80, 64, 8, 152064, False),
    # Mistral 7B v0.3 (v0.1/v0.2 differ only in vocabulary: 32000)
    "mistral-7b": {**_llama(4096, 14336, 32, 32, 8, 32768, False), "model_type": "mistral"},
    # Gemma 2
    "gemma-2-2b": _gemma2(2304, 9216, 26, 8, 4, 256000),
    "gemma-2-9b": _gemma2(3584, 14336, 42, 16, 8, 256000),
    # Phi-3-mini (4k and 128k share these numbers): fused qkv_proj and gate_up_proj, no GQA
    "phi-3-mini": {
        "model_type": "phi3",
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32064,
        "tie_word_embeddings": False,
    },
    # SmolLM2 (Llama architecture, tied embeddings)
    "smollm2-135m": _llama(576, 1536, 30, 9, 3, 49152, True),
    "smollm2-360m": _llama(960, 2560, 32, 15, 5, 49152, True),
    "smollm2-1.7b": _llama(2048, 8192, 24, 32, 32, 49152, True),
}

ALIASES: dict[str, str] = {
    "llama-3-8b": "llama-3.1-8b",  # same architecture as 3.1
    "llama-3-70b": "llama-3.1-70b",
    "mistral-7b-v0.3": "mistral-7b",
    "phi-3-mini-4k": "phi-3-mini",
    "phi-3-mini-128k": "phi-3-mini",
    "smollm2-135m-instruct": "smollm2-135m",
    "smollm2-360m-instruct": "smollm2-360m",
    "smollm2-1.7b-instruct": "smollm2-1.7b",
}

# Hub ids people type, mapped to the bundled names (the bill never downloads anything).
HUB_IDS: dict[str, str] = {
    "meta-llama/llama-3.1-8b": "llama-3.1-8b",
    "meta-llama/llama-3.1-8b-instruct": "llama-3.1-8b",
    "meta-llama/meta-llama-3-8b": "llama-3.1-8b",
    "meta-llama/meta-llama-3-8b-instruct": "llama-3.1-8b",
    "meta-llama/llama-3.1-70b": "llama-3.1-70b",
    "meta-llama/llama-3.1-70b-instruct": "llama-3.1-70b",
    "meta-llama/llama-3.2-1b": "llama-3.2-1b",
    "meta-llama/llama-3.2-1b-instruct": "llama-3.2-1b",
    "meta-llama/llama-3.2-3b": "llama-3.2-3b",
    "meta-llama/llama-3.2-3b-instruct": "llama-3.2-3b",
    "qwen/qwen2.5-0.5b": "qwen2.5-0.5b",
    "qwen/qwen2.5-0.5b-instruct": "qwen2.5-0.5b",
    "qwen/qwen2.5-7b": "qwen2.5-7b",
    "qwen/qwen2.5-7b-instruct": "qwen2.5-7b",
    "qwen/qwen2.5-14b": "qwen2.5-14b",
    "qwen/qwen2.5-14b-instruct": "qwen2.5-14b",
    "qwen/qwen2.5-72b": "qwen2.5-72b",
    "qwen/qwen2.5-72b-instruct": "qwen2.5-72b",
    "mistralai/mistral-7b-v0.3": "mistral-7b",
    "mistralai/mistral-7b-instruct-v0.3": "mistral-7b",
    "google/gemma-2-2b": "gemma-2-2b",
    "google/gemma-2-2b-it": "gemma-2-2b",
    "google/gemma-2-9b": "gemma-2-9b",
    "google/gemma-2-9b-it": "gemma-2-9b",
    "microsoft/phi-3-mini-4k-instruct": "phi-3-mini",
    "microsoft/phi-3-mini-128k-instruct": "phi-3-mini",
    "huggingfacetb/smollm2-135m": "smollm2-135m",
    "huggingfacetb/smollm2-135m-instruct": "smollm2-135m",
    "huggingfacetb/smollm2-360m": "smollm2-360m",
    "huggingfacetb/smollm2-360m-instruct": "smollm2-360m",
    "huggingfacetb/smollm2-1.7b": "smollm2-1.7b",
    "huggingfacetb/smollm2-1.7b-instruct": "smollm2-1.7b",
}


def bundled_config(name: str) -> dict[str, Any] | None:
    """The bundled config for a name, alias or hub id (case-insensitive), or None."""
    key = name.strip().lower()
    key = HUB_IDS.get(key, ALIASES.get(key, key))
    cfg = BUNDLED.get(key)
    return dict(cfg, _name=key) if cfg is not None else None


def bundled_names() -> list[str]:
    return list(BUNDLED)


# The hub id a recipe names for each bundled config (instruct variants: what people fine-tune).
CANONICAL_HUB_ID: dict[str, str] = {
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B-Instruct",
    "llama-3.1-70b": "meta-llama/Llama-3.1-70B-Instruct",
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B-Instruct",
    "llama-3.2-3b": "meta-llama/Llama-3.2-3B-Instruct",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B-Instruct",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B-Instruct",
    "qwen2.5-14b": "Qwen/Qwen2.5-14B-Instruct",
    "qwen2.5-72b": "Qwen/Qwen2.5-72B-Instruct",
    "mistral-7b": "mistralai/Mistral-7B-Instruct-v0.3",
    "gemma-2-2b": "google/gemma-2-2b-it",
    "gemma-2-9b": "google/gemma-2-9b-it",
    "phi-3-mini": "microsoft/Phi-3-mini-4k-instruct",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "smollm2-360m": "HuggingFaceTB/SmolLM2-360M-Instruct",
    "smollm2-1.7b": "HuggingFaceTB/SmolLM2-1.7B-Instruct",
}


def recipe_model_ref(ref: str) -> str:
    """What a recipe should name: built-in names, paths and hub ids as given; bundled names as hub ids."""
    if ref in BUILTIN_MODELS or "/" in ref:
        return ref
    key = ALIASES.get(ref.strip().lower(), ref.strip().lower())
    return CANONICAL_HUB_ID.get(key, ref)
