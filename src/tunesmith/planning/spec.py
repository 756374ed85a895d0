"""A model's shape, read from its config.json (or a bundled copy): every parameter by name and size.

No weights are loaded: the bill is pure arithmetic on these numbers. The parameter names are the ones
transformers gives the model, so LoRA targeting, `freeze` name matching and the counts agree with the
real model (tests/test_plan_bill.py checks them against a model built on the `meta` device).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from ..errors import TunesmithError
from ..models import BUILTIN_MODELS, builtin_cache_dir
from .configs import bundled_config, bundled_names

SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "gemma2", "phi3")


@dataclass(frozen=True)
class LinearSpec:
    """One linear layer inside every decoder layer (in_features -> out_features)."""

    name: str
    path: str  # e.g. "self_attn.q_proj"
    in_features: int
    out_features: int
    bias: bool

    @property
    def params(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    model_type: str
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    linears: tuple[LinearSpec, ...]
    norms: tuple[str, ...]  # RMSNorms per decoder layer (each has `hidden` weights)
    attention: str = "sdpa"  # sdpa: O(s) saved per layer; eager: the s x s scores are saved
    attn_softcap: bool = False
    final_softcap: bool = False
    fused_qkv: bool = False
    fused_gate_up: bool = False
    activation: str = "silu"
    config: dict = field(default_factory=dict, compare=False, repr=False)

    # ---- counts ------------------------------------------------------------------------------
    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def lm_head_params(self) -> int:
        return 0 if self.tied else self.vocab * self.hidden

    @property
    def layer_params(self) -> int:
        return sum(l.params for l in self.linears) + len(self.norms) * self.hidden

    @property
    def layer_linear_params(self) -> int:
        return sum(l.params for l in self.linears)

    @property
    def total_params(self) -> int:
        return self.embed_params + self.lm_head_params + self.layers * self.layer_params + self.hidden

    def named_parameters(self) -> list[tuple[str, tuple[int, ...]]]:
        """Every parameter as transformers names it (tied lm_head listed once, as the embedding)."""
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, self.hidden))]
        for i in range(self.layers):
            p = f"model.layers.{i}."
            for lin in self.linears:
                out.append((f"{p}{lin.path}.weight", (lin.out_features, lin.in_features)))
                if lin.bias:
                    out.append((f"{p}{lin.path}.bias", (lin.out_features,)))
            for norm in self.norms:
                out.append((f"{p}{norm}.weight", (self.hidden,)))
        out.append(("model.norm.weight", (self.hidden,)))
        if not self.tied:
            out.append(("lm_head.weight", (self.vocab, self.hidden)))
        return out

    def summary(self) -> dict:
        return {
            "name": self.name,
            "model_type": self.model_type,
            "parameters": self.total_params,
            "layers": self.layers,
            "hidden": self.hidden,
            "intermediate": self.intermediate,
            "heads": self.heads,
            "kv_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "vocab": self.vocab,
            "tied_embeddings": self.tied,
            "attention": self.attention,
        }


def _get(cfg: dict, key: str, default: Any = None) -> Any:
    value = cfg.get(key, default)
    if value is None and default is None:
        raise TunesmithError(f"model config: '{key}' is missing; the bill needs it to size the model")
    return value


def spec_from_config(cfg: dict, name: str | None = None) -> ModelSpec:
    """A ModelSpec from config.json keys (llama, mistral, qwen2, gemma2 and phi3 families)."""
    cfg = dict(cfg)
    if "text_config" in cfg and "hidden_size" not in cfg:  # multimodal wrappers keep the LM inside
        cfg = {**cfg["text_config"], "model_type": cfg["text_config"].get("model_type", cfg.get("model_type"))}
    model_type = str(cfg.get("model_type", "llama"))
    if model_type not in SUPPORTED_TYPES:
        raise TunesmithError(
            f"model_type '{model_type}': the memory bill knows the {', '.join(SUPPORTED_TYPES)} families; "
            f"use one of the bundled configs ({', '.join(bundled_names())}) with the nearest shape"
        )
    h = int(_get(cfg, "hidden_size"))
    inter = int(_get(cfg, "intermediate_size"))
    layers = int(_get(cfg, "num_hidden_layers"))
    heads = int(_get(cfg, "num_attention_heads"))
    kv = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or h // heads)
    vocab = int(_get(cfg, "vocab_size"))
    tied = bool(cfg.get("tie_word_embeddings", model_type in ("gemma2",)))
    q, kvd = heads * head_dim, kv * head_dim
    kw: dict[str, Any] = {}
    if model_type == "phi3":
        linears = (  # transformers declares o_proj first
            LinearSpec("o_proj", "self_attn.o_proj", q, h, False),
            LinearSpec("qkv_proj", "self_attn.qkv_proj", h, q + 2 * kvd, False),
            LinearSpec("gate_up_proj", "mlp.gate_up_proj", h, 2 * inter, False),
            LinearSpec("down_proj", "mlp.down_proj", inter, h, False),
        )
        kw.update(fused_qkv=True, fused_gate_up=True)
    else:
        if model_type == "qwen2":
            qkv_bias, o_bias, mlp_bias = True, False, False
        else:
            ab = bool(cfg.get("attention_bias", False))
            qkv_bias, o_bias, mlp_bias = ab, ab, bool(cfg.get("mlp_bias", False))
        linears = (
            LinearSpec("q_proj", "self_attn.q_proj", h, q, qkv_bias),
            LinearSpec("k_proj", "self_attn.k_proj", h, kvd, qkv_bias),
            LinearSpec("v_proj", "self_attn.v_proj", h, kvd, qkv_bias),
            LinearSpec("o_proj", "self_attn.o_proj", q, h, o_bias),
            LinearSpec("gate_proj", "mlp.gate_proj", h, inter, mlp_bias),
            LinearSpec("up_proj", "mlp.up_proj", h, inter, mlp_bias),
            LinearSpec("down_proj", "mlp.down_proj", inter, h, mlp_bias),
        )
    norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    if model_type == "gemma2":
        norms = norms + ("pre_feedforward_layernorm", "post_feedforward_layernorm")
        kw.update(
            attention="eager",  # transformers: Gemma 2 does not support sdpa (soft-capping)
            attn_softcap=cfg.get("attn_logit_softcapping") is not None,
            final_softcap=cfg.get("final_logit_softcapping") is not None,
            activation="gelu",
        )
    return ModelSpec(
        name=name or cfg.get("_name") or cfg.get("_name_or_path") or model_type,
        model_type=model_type,
        vocab=vocab,
        hidden=h,
        intermediate=inter,
        layers=layers,
        heads=heads,
        kv_heads=kv,
        head_dim=head_dim,
        tied=tied,
        linears=linears,
        norms=norms,
        config=cfg,
        **kw,
    )


def load_spec(model: Union[str, Path, dict, ModelSpec]) -> ModelSpec:
    """Resolve a model reference to its shape without loading weights.

    Accepts a ModelSpec, a config dict, a bundled name/alias/hub id (`llama-3.1-8b`,
    `Qwen/Qwen2.5-7B-Instruct`), a built-in model name, a folder holding config.json, a config.json
    file, or a hub id whose config.json is in the local Hugging Face cache.
    """
    if isinstance(model, ModelSpec):
        return model
    if isinstance(model, dict):
        return spec_from_config(model)
    ref = str(model)
    bundled = bundled_config(ref)
    if bundled is not None:
        return spec_from_config(bundled, name=ref)
    path = Path(ref).expanduser()
    if path.is_file() and path.suffix == ".json":
        return spec_from_config(_read_json(path), name=ref)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise TunesmithError(f"model: folder '{ref}' has no config.json")
        return spec_from_config(_read_json(path / "config.json"), name=ref)
    if ref in BUILTIN_MODELS and (builtin_cache_dir(ref) / "config.json").is_file():
        return spec_from_config(_read_json(builtin_cache_dir(ref) / "config.json"), name=ref)
    if ref.count("/") == 1 and not ref.startswith((".", "/", "~")):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(ref, "config.json")
        except Exception:  # noqa: BLE001 - an unusable cache is the same as no cache here
            cached = None
        if isinstance(cached, str):
            return spec_from_config(_read_json(Path(cached)), name=ref)
    raise TunesmithError(
        f"model '{ref}': not a bundled config ({', '.join(bundled_names())}), not a built-in model, not a "
        "folder with config.json or a config.json file, and not a hub id in the local cache. "
        "The bill needs only config.json: pass its path"
    )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TunesmithError(f"{path}: cannot read it as JSON: {exc}") from exc
