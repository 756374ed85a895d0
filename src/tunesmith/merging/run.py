"""`tunesmith.merge(spec, out)`: merge models and adapters tensor by tensor into a Hugging Face folder.

1. plan: open every input's safetensors headers (no tensor data), check architectures, tensor names,
   shapes and vocabularies against the base, and lay out the output shards. Every error is raised
   here, before anything is written.
2. stream: for each tensor of the base, read that tensor from each input (for an adapter, compute
   scale * B @ A for that one weight), merge it with a pure function from `methods`, cast it and
   append it to the open shard. Peak memory is a few tensors.
3. finish: copy config, generation config, tokenizer and chat template from the base, write the
   spec as merge_spec.yaml, and rename the temporary folder (next to the target) into place.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from .. import __version__
from ..errors import TunesmithError
from .. import outdir
from ..outdir import check_target, staged
from . import methods
from .io import PlannedTensor, ShardedWriter, TensorInfo
from .sources import Adapter, FullModel, open_input
from .spec import TASK_VECTOR_METHODS, MergeSpec, load_merge_spec, spec_to_yaml

SPEC_FILE = "merge_spec.yaml"
SMALL_TENSOR = 1 << 22  # elements; smaller tensors are merged on one thread
OUT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
COPY_PATTERNS = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "merges.txt",
    "chat_template.jinja", "chat_template.json", "additional_chat_templates",
)
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
_VOCAB_TENSOR = re.compile(r"(embed_tokens|embed_in|wte|word_embeddings|lm_head|embed_out|output\.weight$)")
_BEFORE_LAYERS = re.compile(r"(embed|wte|wpe)")

Input = Union[FullModel, Adapter]


@dataclass
class MergePlan:
    spec: MergeSpec
    reference: FullModel  # the base: tensor list, config and tokenizer, and what task vectors are taken from
    inputs: list[Input]  # the models merged, in spec order (for task-vector methods without the base itself)
    labels: list[str]  # `models[i]` of each input, for messages
    tensors: list[PlannedTensor]
    num_layers: int


# ---- planning --------------------------------------------------------------------------------------------
def plan_merge(spec: MergeSpec) -> MergePlan:
    """Open and check every input; raise a TunesmithError naming the problem before anything is written."""
    entries = spec.merged_models()
    index_of = {id(e): i for i, e in enumerate(spec.models)}
    labels = [f"models[{index_of[id(e)]}]" for e in entries]
    if not entries:
        raise TunesmithError(
            f"{spec.method}: every entry of `models` is the base model itself, so there is nothing to merge; "
            "list the fine-tuned models (or adapters) to merge into the base"
        )
    inputs: list[Input] = [open_input(e.model, f"{label}.model") for e, label in zip(entries, labels)]
    reference = _reference(spec, inputs, labels)
    _check_inputs(reference, inputs, labels)
    cfg = reference.config
    layer_ids = [int(m.group(1)) for n in reference.infos if (m := _LAYER.search(n))]
    num_layers = int(cfg.get("num_hidden_layers") or cfg.get("n_layer") or (max(layer_ids) + 1 if layer_ids else 1))
    tensors = []
    for name, info in reference.infos.items():
        dtype = info.dtype
        if spec.dtype != "auto" and info.dtype.is_floating_point:
            dtype = OUT_DTYPES[spec.dtype]
        tensors.append(PlannedTensor(name, dtype, info.shape))
    return MergePlan(spec, reference, inputs, labels, tensors, num_layers)


def _reference(spec: MergeSpec, inputs: list[Input], labels: list[str]) -> FullModel:
    if spec.base_model:
        base = open_input(spec.base_model, "base_model")
        if isinstance(base, Adapter):
            raise TunesmithError(
                f"base_model: '{spec.base_model}' is an adapter, not a full model; set base_model to the model it was "
                f"trained on ({base.recorded_base or 'see its adapter_config.json'}) and list the adapter under models, "
                "or export it first with `tunesmith export RUN --merge --out DIR`"
            )
        return base
    adapters = [(a, label) for a, label in zip(inputs, labels) if isinstance(a, Adapter)]
    if not adapters:
        return inputs[0]  # linear / slerp of full models: the first model is the reference
    bases = {a.recorded_base for a, _ in adapters}
    if len(bases) != 1 or None in bases:
        said = ", ".join(f"{label}: {a.recorded_base or 'unknown'}" for a, label in adapters)
        raise TunesmithError(
            f"base_model is not set and the adapters do not name one base model ({said}); set base_model to the "
            "model the adapters were trained on"
        )
    (recorded,) = bases
    base = open_input(recorded, f"base_model (from {adapters[0][1]}, which was trained on it)")
    if isinstance(base, Adapter):
        raise TunesmithError(f"{adapters[0][1]}: its base '{recorded}' is itself an adapter; set base_model to a full model")
    return base


_VOCAB_FIX = (
    "Models can only be merged when they share one tokenizer: merge models fine-tuned from the same base without "
    "added tokens, or resize both to one vocabulary first (model.resize_token_embeddings with one shared "
    "tokenizer, then save_pretrained) and merge the saved folders"
)


def _vocab_message(what: str, base_what: str) -> str:
    return f"different vocabulary sizes: {what}, but the base {base_what}. {_VOCAB_FIX}"


def _shape_error(name: str, who: str, shape, base_ref: str, base_shape, fix: str) -> TunesmithError:
    """`who` is e.g. "models[1] 'path' has" or "models[0]: adapter 'path' (trained on X) has an update"."""
    shape, base_shape = tuple(shape), tuple(base_shape)
    if (
        len(shape) == len(base_shape) and len(shape) >= 1 and shape[0] != base_shape[0]
        and shape[1:] == base_shape[1:] and _VOCAB_TENSOR.search(name)
    ):
        return TunesmithError(_vocab_message(
            f"{who} {shape[0]} rows in '{name}' {shape}", f"'{base_ref}' has {base_shape[0]} {base_shape}"
        ))
    return TunesmithError(
        f"shape mismatch in tensor '{name}': {who} {shape} but the base '{base_ref}' has {base_shape}; {fix}"
    )


def _check_inputs(reference: FullModel, inputs: list[Input], labels: list[str]) -> None:
    ref_infos = reference.infos
    rcfg = reference.config
    for src, where in zip(inputs, labels):
        if isinstance(src, FullModel):
            cfg = src.config
            if rcfg.get("model_type") and cfg.get("model_type") and rcfg["model_type"] != cfg["model_type"]:
                raise TunesmithError(
                    f"architecture mismatch: {where} '{src.ref}' is a {cfg['model_type']} model but the base "
                    f"'{reference.ref}' is {rcfg['model_type']}; merge only models of one architecture"
                )
            if rcfg.get("vocab_size") and cfg.get("vocab_size") and rcfg["vocab_size"] != cfg["vocab_size"]:
                raise TunesmithError(_vocab_message(
                    f"{where} '{src.ref}' has vocab_size {cfg['vocab_size']}",
                    f"'{reference.ref}' has {rcfg['vocab_size']}",
                ))
            for name in ref_infos:
                if name not in src.infos:
                    raise TunesmithError(
                        f"architecture mismatch: {where} '{src.ref}' has no tensor '{name}', which the base "
                        f"'{reference.ref}' has; merge only models with the same architecture and layer count"
                    )
            for name in src.infos:
                if name not in ref_infos:
                    raise TunesmithError(
                        f"architecture mismatch: {where} '{src.ref}' has a tensor '{name}' that the base "
                        f"'{reference.ref}' lacks; merge only models with the same architecture and layer count"
                    )
            for name, info in ref_infos.items():
                other = src.infos[name]
                if other.shape != info.shape:
                    raise _shape_error(name, f"{where} '{src.ref}' has", other.shape, reference.ref, info.shape,
                                       "the models have different architectures (merge only models fine-tuned "
                                       "from the same base)")
        else:
            trained_on = f" (it was trained on '{src.recorded_base}')" if src.recorded_base else ""
            for name in sorted(src.touched()):
                if name not in ref_infos and name.startswith("lm_head") and rcfg.get("tie_word_embeddings"):
                    raise TunesmithError(
                        f"{where}: adapter '{src.ref}' changes '{name}', but the base '{reference.ref}' ties its "
                        "lm_head to the input embeddings (tie_word_embeddings), so there is no separate weight to "
                        "change; merging such an adapter is not supported (train it without lm_head in "
                        "target_modules and modules_to_save)"
                    )
                if name not in ref_infos:
                    raise TunesmithError(
                        f"{where}: adapter '{src.ref}' changes '{name}', which the base '{reference.ref}' does not "
                        f"have{trained_on}; set base_model to the model the adapter was trained on"
                    )
                base_shape = ref_infos[name].shape
                if name in src.lora:
                    shape, what = src.lora[name].shape, "an update scale * B @ A of shape"
                else:
                    shape, what = src.replaced[name].shape, "a full tensor of shape"
                if tuple(shape) != tuple(base_shape):
                    raise _shape_error(name, f"{where}: adapter '{src.ref}'{trained_on} has {what}", shape,
                                       reference.ref, base_shape,
                                       "set base_model to the model the adapter was trained on")


# ---- per-tensor merging ----------------------------------------------------------------------------------
def tensor_seed(seed: int, model_index: int, name: str) -> int:
    """A seed per (spec seed, model, tensor): the same merge is reproducible whatever the order or sharding."""
    digest = hashlib.blake2b(f"{seed}/{model_index}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def layer_index(name: str) -> Optional[int]:
    """The decoder layer a tensor belongs to, or None (embeddings, final norm, lm_head)."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def layer_position(name: str, num_layers: int) -> float:
    """Where a tensor sits in depth for a gradient: layer i of L is i / (L - 1); embeddings 0; the rest
    (final norm, lm_head) 1."""
    layer = layer_index(name)
    if layer is not None:
        return layer / max(1, num_layers - 1)
    return 0.0 if _BEFORE_LAYERS.search(name) else 1.0


def untouched_stay_base(spec: MergeSpec) -> bool:
    """Whether a tensor no adapter changes merges to the base itself (every input is base + 0 there): true
    for task-vector methods, slerp and normalized linear; a linear merge whose weights are not normalized
    scales even the untouched tensors."""
    return spec.method in TASK_VECTOR_METHODS or spec.method == "slerp" or spec.effective_normalize


def merge_tensor(plan: MergePlan, name: str) -> torch.Tensor:
    """The merged float32 tensor `name` (inputs read as needed)."""
    spec, ref = plan.spec, plan.reference
    cache: dict[str, torch.Tensor] = {}

    def base() -> torch.Tensor:
        if "base" not in cache:
            cache["base"] = ref.read(name).to(torch.float32)
        return cache["base"]

    def full(src: Input) -> torch.Tensor:
        if isinstance(src, FullModel):
            return src.read(name).to(torch.float32)
        delta = src.delta(name, base)
        return base().clone() if delta is None else delta.add_(base())

    def delta(src: Input) -> Optional[torch.Tensor]:
        if isinstance(src, FullModel):
            return src.read(name).to(torch.float32).sub_(base())
        return src.delta(name, base)

    def lazy(fn: Callable[[Input], Optional[torch.Tensor]]) -> Iterator[Optional[torch.Tensor]]:
        for src in plan.inputs:
            yield fn(src)  # no local name holds the tensor, so the consumer can release it

    m = spec.method
    untouched = all(isinstance(s, Adapter) and name not in s.touched() for s in plan.inputs)
    if untouched and untouched_stay_base(spec):
        return base().clone()
    if m == "linear":
        return methods.linear(lazy(full), spec.weights(), spec.effective_normalize, consume=True)
    if m == "slerp":
        t = methods.interpolate_gradient(spec.effective_t, layer_position(name, plan.num_layers))
        first = full(plan.inputs[0])
        return methods.slerp(first, full(plan.inputs[1]), t)
    weights, lam, norm = spec.weights(), spec.effective_lambda, spec.effective_normalize
    if m == "task_arithmetic":
        return methods.task_arithmetic(base(), lazy(delta), weights, lam, norm, consume=True)
    seeds = [tensor_seed(spec.seed, i, name) for i in range(len(plan.inputs))]
    if m == "ties":
        return methods.ties(base(), lazy(delta), weights, spec.densities(), lam, norm, consume=True)
    if m == "dare_linear":
        return methods.dare_linear(base(), lazy(delta), weights, spec.densities(), seeds, lam, norm,
                                   spec.effective_rescale, consume=True)
    if m == "dare_ties":
        return methods.dare_ties(base(), lazy(delta), weights, spec.densities(), seeds, lam, norm,
                                 spec.effective_rescale, consume=True)
    raise AssertionError(m)


def _malloc_trim():
    """glibc keeps freed blocks under its mmap threshold (up to 32 MiB) in the heap, where fragmentation
    adds tensors to the resident size; malloc_trim(0) hands free pages back. A no-op elsewhere."""
    try:
        import ctypes

        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    return lambda: trim(0)


# ---- the output folder -----------------------------------------------------------------------------------
def _reads(plan: MergePlan, spec_file: Optional[Union[str, Path]]) -> list[outdir.Input]:
    """The files and folders the merge reads, which --out must stay clear of."""
    found = outdir.inputs("merge spec", spec_file)
    for src, label in zip(plan.inputs, plan.labels):
        found += outdir.inputs(f"input {label}", src.folder)
    return found + outdir.inputs("base model", plan.reference.folder)


def _copy_model_files(reference: Path, out: Path, dtype: str) -> list[str]:
    copied = []
    for name in COPY_PATTERNS:
        src = reference / name
        if src.is_dir():
            shutil.copytree(src, out / name)
        elif src.is_file():
            shutil.copy2(src, out / name)
        else:
            continue
        copied.append(name)
    config_path = out / "config.json"
    if config_path.is_file() and dtype != "auto":
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config["dtype"] = dtype
        if "torch_dtype" in config:
            config["torch_dtype"] = dtype
        config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return copied


def _write_spec(spec: MergeSpec, out: Path) -> None:
    header = f"# Written by tunesmith {__version__} `tunesmith merge`: the spec this folder was merged from.\n"
    (out / SPEC_FILE).write_text(header + spec_to_yaml(spec), encoding="utf-8")


def merge(
    spec, out: Union[str, Path], overwrite: bool = False, *, progress: bool = True,
    spec_file: Optional[Union[str, Path]] = None, also_reads: Sequence[outdir.Input] = (),
    then: Optional[Callable[[Path], None]] = None,
) -> Path:
    """Merge as the spec says (a MergeSpec, a dict, or a YAML path) into the folder `out`; return it.

    The folder loads with `AutoModelForCausalLM.from_pretrained(out)` alone. It is written into a
    temporary folder next to `out` and swapped in at the end (outdir.staged), so a failure leaves
    nothing behind and an earlier `out` as it was; a non-empty `out` is replaced only with
    overwrite=True, and never when it is, holds or lies inside an input (`spec_file`: the spec's YAML,
    when `spec` was loaded from one by the caller, and `also_reads`: other inputs of the caller). `then(tmp)`
    writes more files beside the merged model before the folder is swapped in (the search's tables).
    """
    if isinstance(spec, (str, Path)):
        spec_file = spec
    spec = load_merge_spec(spec)
    plan = plan_merge(spec)
    target = check_out(plan, out, overwrite, spec_file, also_reads)
    with staged(target) as tmp:
        _write(plan, tmp, progress)
        if then is not None:
            then(tmp)
    return target


def check_out(plan: MergePlan, out: Union[str, Path], overwrite: bool, spec_file: Optional[Union[str, Path]] = None,
              also_reads: Sequence[outdir.Input] = ()) -> Path:
    """The output folder, refused (TunesmithError) if writing it could destroy an input or earlier work."""
    target = Path(out).expanduser()
    check_target(target, _reads(plan, spec_file) + list(also_reads), may_replace=overwrite, flag="--out",
                 example="merged/my-model", taken="exists and is not empty; pass --overwrite or choose another folder")
    return target


def _write(plan: MergePlan, tmp: Path, progress: bool) -> None:
    """Stream every merged tensor into shards in `tmp`, then the model files and the spec beside them."""
    spec = plan.spec
    writer = ShardedWriter(tmp, plan.tensors, spec.max_shard_size)
    bar = tqdm(total=len(plan.tensors), desc=f"merge ({spec.method})", unit="tensor", disable=not progress,
               dynamic_ncols=True)
    release = _malloc_trim()
    threads = torch.get_num_threads()
    try:
        for planned in plan.tensors:
            bar.set_postfix_str(planned.name, refresh=False)
            # One thread for small tensors: the work per op is too small to share, and when the cores are
            # busy with other processes, waking a second thread for each of ~20 ops per tensor was
            # measured 6x slower on this project's 2-core machine.
            torch.set_num_threads(1 if math.prod(planned.shape) < SMALL_TENSOR else threads)
            info: TensorInfo = plan.reference.infos[planned.name]
            if not info.dtype.is_floating_point:
                merged = plan.reference.read(planned.name)  # integer/bool buffers: taken from the base
            else:
                merged = merge_tensor(plan, planned.name).to(planned.dtype)
            writer.write(planned.name, merged)
            del merged
            release()
            bar.update(1)
        writer.close()
        bar.close()
        _copy_model_files(plan.reference.folder, tmp, spec.dtype)
        _write_spec(spec, tmp)
    except BaseException:
        bar.close()
        writer.abort()
        raise
    finally:
        torch.set_num_threads(threads)
