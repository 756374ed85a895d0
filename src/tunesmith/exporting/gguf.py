"""`tunesmith export RUN --format gguf`: the merged model as one .gguf (llama.cpp, Ollama, LM Studio), plus an
Ollama Modelfile.

Written with `gguf`, llama.cpp's own writer library, the way llama.cpp's convert_hf_to_gguf.py writes the
Llama family (ggml-org/llama.cpp@a458664, `LlamaModel`): llama.cpp's tensor names, q/k rows permuted from
Hugging Face's rotate-half order into the interleaved pairs llama.cpp's RoPE expects (transformers' GGUF
loader undoes exactly this, `LlamaTensorProcessor._reverse_permute_weights`), the byte-level BPE tokenizer
(vocabulary, merges, token types, special ids, end of turn) and the chat template in the metadata.

Quantization (gguf.quants): 1-D tensors (norms) stay F32, as in llama.cpp. q8_0 and q4_0 quantize every
matrix in blocks of 32 along its rows; with q4_0 the output matrix (`output`, or `token_embd` when the model
ties them) is kept at q8_0, as llama-quantize keeps it at a higher precision (Q6_K, which gguf-py cannot
write). A matrix whose rows are not a multiple of the block size falls back to F16, as in convert_hf_to_gguf.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from ..config import RunConfig
from ..errors import TunesmithError
from ..models import resolve_model
from ..outdir import check_target, inputs, model_input, staged
from ..rundir import is_adapter_run, is_run_dir, load_run_config
from .merged import merged_model
from .ollama import modelfile
from .template import end_of_turn, role_pieces, served_template

Q = gguf.GGMLQuantizationType
QUANTS = {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}
FILE_TYPES = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
SUPPORTED_MODEL_TYPES = ("llama",)  # the Llama family: Llama 1-3, SmolLM, TinyLlama, ... with plain RoPE

# Hugging Face Llama names -> llama.cpp's (gguf.constants.TENSOR_NAMES for MODEL_ARCH.LLAMA).
GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


def export_gguf(run_dir: str, out: str, quant: str = "f16", overwrite: bool = False) -> Path:
    """Write `out`/<run>-<quant>.gguf and `out`/Modelfile; return the .gguf's path.

    Everything is checked (quant, run, architecture, tokenizer, template) before `out` is touched; the folder
    is written next to `out` and swapped in when complete.
    """
    if quant not in QUANTS:
        raise TunesmithError(f"--quant {quant}: unknown; choose one of {', '.join(QUANTS)}")
    if not is_run_dir(run_dir):
        raise TunesmithError(f"'{run_dir}' is not a trained run folder (no adapter or model); train first")
    config = load_run_config(run_dir)
    check_architecture(_model_config(run_dir, config))
    target = Path(out).expanduser()
    reads = inputs("run folder", run_dir) + model_input(config.model, "base model")
    check_target(target, reads, may_replace=overwrite, flag="--out", example="exports/my-model-gguf",
                 taken="exists and is not empty; pass --overwrite or choose another folder")
    model, tokenizer = merged_model(run_dir, config)
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(run_dir).resolve().name)
    vocab = tokenizer_metadata(tokenizer, model.config.vocab_size)
    pieces = role_pieces(tokenizer)
    file_name = f"{name}-{quant}.gguf"
    text = modelfile(file_name, pieces, [vocab.end_of_turn_text], config.data.system_prompt)
    template = served_template(tokenizer.chat_template, config.data.system_prompt)
    with staged(target) as tmp:
        write_gguf(tmp / file_name, model, vocab, template, quant, name)
        (tmp / "Modelfile").write_text(text, encoding="utf-8")
    return target / file_name


def _model_config(run_dir: str, config: RunConfig):
    """The config of the model the export writes: the base's for an adapter run, the run's own otherwise."""
    from transformers import AutoConfig  # heavy: read only when exporting

    resolved = resolve_model(config.model if is_adapter_run(run_dir) else run_dir)
    return AutoConfig.from_pretrained(resolved.path, gguf_file=resolved.gguf_file,
                                      trust_remote_code=config.trust_remote_code)


def check_architecture(model_config) -> None:
    """One line naming what this writer cannot write: another architecture, RoPE scaling, biases."""
    model_type = getattr(model_config, "model_type", "?")
    arch = ", ".join(getattr(model_config, "architectures", None) or []) or model_type
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise TunesmithError(
            f"--format gguf writes the Llama family (model_type {', '.join(SUPPORTED_MODEL_TYPES)}); this run's model is "
            f"'{model_type}' ({arch}): export --merge and convert that folder with llama.cpp's convert_hf_to_gguf.py"
        )
    rope = dict(getattr(model_config, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        raise TunesmithError(
            f"--format gguf: this model uses RoPE scaling '{rope['rope_type']}', which tunesmith's GGUF writer does "
            "not write yet: export --merge and convert that folder with llama.cpp's convert_hf_to_gguf.py"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(model_config, flag, False):
            raise TunesmithError(f"--format gguf: this model has {flag}=true, which tunesmith's GGUF writer does not "
                                 "write yet: export --merge and convert that folder with llama.cpp's convert_hf_to_gguf.py")


# --- tokenizer -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Vocab:
    pre: str  # llama.cpp's name for the pre-tokenizer (how text is split before BPE)
    tokens: list[str]
    types: list[int]  # gguf.TokenType per token
    merges: list[str]  # "left right", best first
    special: dict  # gguf writer method -> token id (bos, eos, unk, pad, eot)
    add_bos: bool
    add_eos: bool
    end_of_turn_text: str


def tokenizer_metadata(tokenizer, vocab_size: int) -> Vocab:
    """What llama.cpp needs to tokenize exactly as the Hugging Face tokenizer does."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    pre = pre_tokenizer_name(spec)
    ids = tokenizer.get_vocab()
    if len(ids) > vocab_size or max(ids.values()) >= vocab_size:
        raise TunesmithError(f"--format gguf: the tokenizer has {len(ids)} tokens but the model's embedding only "
                             f"{vocab_size} rows; resize the embedding (model.resize_token_embeddings) and train again")
    by_id = {i: t for t, i in ids.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # embedding rows past the tokenizer: padding, as llama.cpp names it
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL if i not in added else
                         gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    eot_text = end_of_turn(tokenizer)
    special = {"add_bos_token_id": tokenizer.bos_token_id, "add_eos_token_id": tokenizer.eos_token_id,
               "add_unk_token_id": tokenizer.unk_token_id, "add_pad_token_id": tokenizer.pad_token_id,
               "add_eot_token_id": ids[eot_text]}
    probe = tokenizer("a")["input_ids"]
    return Vocab(pre, tokens, [int(t) for t in types], merges, {k: v for k, v in special.items() if v is not None},
                 add_bos=bool(probe) and probe[0] == tokenizer.bos_token_id,
                 add_eos=bool(probe) and probe[-1] == tokenizer.eos_token_id, end_of_turn_text=eot_text)


# llama.cpp's byte-level pre-tokenizers (src/llama-vocab.cpp), by the Hugging Face pre-tokenizer that splits alike.
LLAMA3_SPLIT = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")


def pre_tokenizer_name(spec: dict) -> str:
    """llama.cpp's pre-tokenizer that splits text as this tokenizer.json does: `gpt-2` for GPT-2's byte-level
    regex (llama.cpp's spelling: it refuses `gpt2`), `smollm` for single digits then GPT-2's regex, `llama-bpe`
    for Llama 3's split."""
    if spec["model"]["type"] != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise TunesmithError(
            f"--format gguf writes byte-level BPE tokenizers (GPT-2 style); this one is {spec['model']['type']}: "
            "export --merge and convert that folder with llama.cpp's convert_hf_to_gguf.py"
        )
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and steps[0].get("pattern", {}).get("Regex") == LLAMA3_SPLIT \
            and not steps[1].get("use_regex", True):
        return "llama-bpe"
    raise TunesmithError(
        f"--format gguf: the tokenizer's pre-tokenizer ({' + '.join(map(str, kinds))}) is not one tunesmith maps to "
        "llama.cpp's yet: export --merge and convert that folder with llama.cpp's convert_hf_to_gguf.py"
    )


# --- tensors -------------------------------------------------------------------------------------


def permute_for_rope(weight: np.ndarray, heads: int) -> np.ndarray:
    """Rows of each head from Hugging Face's order (first half, second half of the head) to llama.cpp's
    interleaved pairs: row j of the first half and row j of the second half become rows 2j and 2j + 1."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_tensors(state_dict: dict, model_config) -> list[tuple[str, np.ndarray]]:
    """(llama.cpp name, fp32 array) for every tensor the file holds; a tied lm_head is written once."""
    heads, kv_heads = model_config.num_attention_heads, model_config.num_key_value_heads
    out = []
    for name, tensor in state_dict.items():
        if name == "lm_head.weight" and model_config.tie_word_embeddings:
            continue
        array = tensor.detach().to("cpu").float().numpy()
        layer = LAYER.fullmatch(name)
        if layer is None:
            gguf_name = GLOBAL_NAMES.get(name)
        else:
            part = LAYER_NAMES.get(layer.group(2))
            gguf_name = f"blk.{layer.group(1)}.{part}" if part else None
            if layer.group(2) == "self_attn.q_proj.weight":
                array = permute_for_rope(array, heads)
            elif layer.group(2) == "self_attn.k_proj.weight":
                array = permute_for_rope(array, kv_heads)
        if gguf_name is None:
            raise TunesmithError(f"--format gguf: the model has a tensor '{name}' that a Llama GGUF has no place for; "
                                 "export --merge and convert that folder with llama.cpp's convert_hf_to_gguf.py")
        out.append((gguf_name, array))
    return out


def tensor_type(name: str, array: np.ndarray, quant: str, tied: bool):
    """The GGML type `name` is stored in under `quant` (see the module docstring for the rules)."""
    if array.ndim == 1:
        return Q.F32
    qtype = QUANTS[quant]
    is_output = name == "output.weight" or (tied and name == "token_embd.weight")
    if qtype == Q.Q4_0 and is_output:
        qtype = Q.Q8_0
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    return qtype if array.shape[-1] % block == 0 else Q.F16


def write_gguf(path: Path, model, vocab: Vocab, chat_template: str, quant: str, name: str) -> None:
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(float(dict(cfg.rope_parameters or {}).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(FILE_TYPES[quant])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    for method, token_id in vocab.special.items():
        getattr(writer, method)(token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    writer.add_chat_template(chat_template)
    for gguf_name, array in gguf_tensors(model.state_dict(), cfg):
        qtype = tensor_type(gguf_name, array, quant, cfg.tie_word_embeddings)
        writer.add_tensor(gguf_name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
