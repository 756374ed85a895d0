"""The inputs of a merge: full model folders and LoRA adapters, read one tensor at a time.

A full model is a Hugging Face folder with model.safetensors (or shards and an index). An adapter is a
PEFT LoRA folder (adapter_config.json + adapter_model.safetensors), or a `tunesmith train` run folder,
which is one with a config.yaml whose `model` names the base. An adapter's task vector for a weight is
scale * B @ A, with scale = lora_alpha / r (lora_alpha / sqrt(r) with use_rslora), computed for one
weight at a time when the engine reaches it.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import yaml

from ..errors import TunesmithError
from ..models import resolve_model
from .io import ModelWeights, SafetensorsFile, TensorInfo, read_tensor

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
RUN_CONFIG = "config.yaml"
PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>A|B)(?:\.[^.]+)?\.weight$")
_LORA_EMBED_KEY = re.compile(r"^(?P<module>.+)\.lora_embedding_(?P<which>A|B)(?:\.[^.]+)?$")
_UNSUPPORTED = ("lora_magnitude_vector", "lora_bias", "trainable_tokens", "lora_B.bias", "lora_A.bias", "prompt_")


def is_adapter_dir(path: Path) -> bool:
    return path.is_dir() and (path / ADAPTER_CONFIG).is_file()


class FullModel:
    """A full model folder: every tensor read from its safetensors files."""

    kind = "full"

    def __init__(self, ref: str, folder: Path):
        self.ref = ref
        self.folder = folder
        self.weights = ModelWeights(folder)
        config_path = folder / "config.json"
        self.config: dict = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}

    @property
    def infos(self) -> dict[str, TensorInfo]:
        return self.weights.infos

    def read(self, name: str) -> torch.Tensor:
        return self.weights.read(name)

    def describe(self) -> str:
        arch = self.config.get("model_type") or "?"
        return f"'{self.ref}' ({arch})"


@dataclass
class LoraTarget:
    a: TensorInfo
    b: TensorInfo
    scale: float
    embedding: bool = False
    transpose: bool = False

    @property
    def shape(self) -> tuple[int, ...]:
        out = self.b.shape[0]
        inner = self.a.shape[1]
        return (inner, out) if (self.embedding or self.transpose) else (out, inner)


@dataclass
class Adapter:
    """A PEFT LoRA adapter (or run folder) over a base model."""

    ref: str
    folder: Path
    config: dict
    recorded_base: Optional[str]
    lora: dict[str, LoraTarget] = field(default_factory=dict)  # base tensor name -> its low-rank update
    replaced: dict[str, TensorInfo] = field(default_factory=dict)  # base tensor name -> full new tensor

    kind = "adapter"

    def describe(self) -> str:
        return f"adapter '{self.ref}'"

    def touched(self) -> set[str]:
        return set(self.lora) | set(self.replaced)

    def delta(self, name: str, read_base: Callable[[], torch.Tensor]) -> Optional[torch.Tensor]:
        """The task vector of one base tensor in float32, or None if the adapter leaves it alone."""
        target = self.lora.get(name)
        if target is not None:
            a = read_tensor(target.a).to(torch.float32)
            b = read_tensor(target.b).to(torch.float32)
            delta = b @ a
            del a, b
            if target.embedding or target.transpose:
                delta = delta.T.contiguous()
            return delta.mul_(target.scale)
        info = self.replaced.get(name)
        if info is not None:
            return read_tensor(info).to(torch.float32).sub_(read_base().to(torch.float32))
        return None


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern: a key matches a module name that ends with it (or a regex)."""
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


def load_adapter(ref: str, folder: Path, where: str) -> Adapter:
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TunesmithError(f"{where}: cannot read '{folder / ADAPTER_CONFIG}': {exc}") from exc
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise TunesmithError(
            f"{where}: '{ref}' is a {peft_type} adapter; only LoRA adapters can be merged. Merge it into its base "
            "with PEFT's merge_and_unload (or `tunesmith export`) and list the full folder instead"
        )
    if config.get("use_dora"):
        raise TunesmithError(
            f"{where}: '{ref}' is a DoRA adapter, whose update is not scale * B @ A; export it as a full model "
            "first (`tunesmith export RUN --merge --out DIR`) and merge that folder"
        )
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        bin_file = folder / "adapter_model.bin"
        extra = " (it has adapter_model.bin: tunesmith never unpickles weights; re-save it with PEFT's save_pretrained)" if bin_file.exists() else ""
        raise TunesmithError(f"{where}: '{ref}' has no {ADAPTER_WEIGHTS}{extra}")
    recorded = None
    run_config = folder / RUN_CONFIG
    if run_config.is_file():
        try:
            recorded = (yaml.safe_load(run_config.read_text(encoding="utf-8")) or {}).get("model", "smollm2-135m-instruct")
        except yaml.YAMLError:
            recorded = None
    recorded = recorded or config.get("base_model_name_or_path")
    adapter = Adapter(ref=ref, folder=folder, config=config, recorded_base=recorded)

    f = SafetensorsFile(weights)
    halves: dict[tuple[str, bool], dict[str, TensorInfo]] = {}
    for key, info in f.infos.items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        if any(u in name for u in _UNSUPPORTED):
            raise TunesmithError(
                f"{where}: '{ref}' has '{key}', a kind of adapter weight tunesmith does not merge (DoRA magnitudes, "
                "LoRA biases, trainable tokens); export it as a full model first (`tunesmith export`) and merge that"
            )
        m = _LORA_KEY.match(name)
        embedding = False
        if m is None:
            m = _LORA_EMBED_KEY.match(name)
            embedding = m is not None
        if m is not None:
            halves.setdefault((m["module"], embedding), {})[m["which"]] = info
            continue
        # A full tensor (modules_to_save, or a bias trained with bias="all"): it replaces the base tensor.
        name = re.sub(r"\.modules_to_save\.[^.]+\.", ".", name)
        adapter.replaced[name] = info
    use_rslora = bool(config.get("use_rslora"))
    for (module, embedding), ab in halves.items():
        if set(ab) != {"A", "B"}:
            missing = ({"A", "B"} - set(ab)).pop()
            raise TunesmithError(f"{where}: '{ref}' has lora_{'B' if missing == 'A' else 'A'} but no lora_{missing} for '{module}'")
        a, b = ab["A"], ab["B"]
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
            raise TunesmithError(
                f"{where}: '{ref}': the LoRA factors of '{module}' do not fit together (A {a.shape}, B {b.shape}); "
                "A must be r x in and B out x r"
            )
        r = a.shape[0]
        alpha = float(_pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", r)))
        scale = alpha / math.sqrt(r) if use_rslora else alpha / r
        adapter.lora[f"{module}.weight"] = LoraTarget(a, b, scale, embedding, bool(config.get("fan_in_fan_out")) and not embedding)
    return adapter


def resolve_folder(ref: str, where: str) -> Path:
    """A full model reference -> the local folder holding its safetensors."""
    try:
        resolved = resolve_model(ref)
    except TunesmithError as exc:
        raise TunesmithError(f"{where}: {str(exc).removeprefix('model: ')}") from None
    if resolved.gguf_file:
        raise TunesmithError(
            f"{where}: '{ref}' is a GGUF file; merging reads safetensors. Load it once with transformers and "
            "save_pretrained it to a folder (built-in model names are converted for you), then merge the folder"
        )
    if resolved.kind == "hub":
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(ref, local_files_only=True))
        except Exception as exc:  # noqa: BLE001 - the hub client raises many types
            raise TunesmithError(
                f"{where}: hub model '{ref}' is not fully in the local Hugging Face cache ({type(exc).__name__}); "
                "download it where there is network (`huggingface-cli download ...`) and point at the folder"
            ) from None
    return Path(resolved.path)


def open_input(ref: str, where: str) -> FullModel | Adapter:
    path = Path(ref).expanduser()
    if is_adapter_dir(path):
        return load_adapter(ref, path, where)
    if path.is_dir() and (path / RUN_CONFIG).is_file() and not (path / "config.json").is_file():
        raise TunesmithError(
            f"{where}: run folder '{ref}' has no adapter yet (training did not finish); finish it with "
            f"`tunesmith train ... --resume` or point at another run"
        )
    return FullModel(ref, resolve_folder(ref, where))
