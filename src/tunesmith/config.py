"""The run config: one YAML file, validated by pydantic, with defaults a beginner can trust.

Every error names the key path, the bad value and the fix; unknown keys get the nearest valid name.
"""
from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import TunesmithError


_SCIENTIFIC = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def _scientific_to_float(value: Any) -> Any:
    """YAML 1.1 reads `1e-4` as a string; accept it as the number the user meant."""
    if isinstance(value, str) and _SCIENTIFIC.match(value.strip()):
        return float(value)
    return value


Number = Annotated[float, BeforeValidator(_scientific_to_float)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    train: Union[str, list[str]] = Field(
        "", description="Training data: a .jsonl/.json/.csv/.parquet file, a list of them, or a hub dataset id."
    )
    eval: Optional[Union[str, list[str]]] = Field(
        None, description="Held-out data in the same formats; when empty, `eval_split` of train is held out."
    )
    eval_split: Number = Field(
        0.1, ge=0.0, lt=1.0, description="Share of train held out for evaluation when `eval` is not given."
    )
    format: Literal["auto", "alpaca", "sharegpt", "messages", "prompt_completion"] = Field(
        "auto", description="Row format; `auto` detects it from the keys of the first row."
    )
    chat_template: Optional[str] = Field(
        None, description="A Jinja chat template (file path or inline string) that replaces the tokenizer's."
    )
    system_prompt: Optional[str] = Field(
        None, description="System message added to every conversation that has none."
    )
    max_length: int = Field(1024, ge=8, description="Longest tokenized example, in tokens.")
    truncation: Literal["drop", "truncate"] = Field(
        "drop", description="What to do with longer examples: drop them (safe default) or cut them at max_length."
    )
    train_on: Literal["all_assistant", "last_assistant", "everything"] = Field(
        "all_assistant",
        description="Which tokens carry loss: every assistant turn, only the last one, or every token.",
    )
    split: str = Field("train", description="Split to read from a hub dataset.")


METHOD_NAMES = ("lora", "dora", "qlora", "vera", "adalora", "loraplus", "full", "freeze", "galore")
ADAPTER_METHODS = ("lora", "dora", "qlora", "vera", "adalora", "loraplus")
LORA_FAMILY = ("lora", "dora", "qlora", "loraplus")

# Which methods each option applies to; setting it for another method is an error that names both.
OPTION_METHODS: dict[str, tuple[str, ...]] = {
    "alpha": ADAPTER_METHODS[:3] + ("adalora", "loraplus"),
    "dropout": ADAPTER_METHODS,
    "target_modules": ADAPTER_METHODS + ("galore",),
    "rslora": LORA_FAMILY + ("adalora",),
    "init": ("lora", "dora", "loraplus"),
    "loraplus_lr_ratio": ("lora", "dora", "qlora", "loraplus"),
    "trainable_layers": ("freeze",),
    "trainable_modules": ("freeze",),
    "init_r": ("adalora",),
    "target_r": ("adalora",),
    "tinit": ("adalora",),
    "tfinal": ("adalora",),
    "delta_t": ("adalora",),
    "orth_reg_weight": ("adalora",),
    "d_initial": ("vera",),
    "quant_type": ("qlora",),
    "double_quant": ("qlora",),
    "galore_rank": ("galore",),
    "update_proj_gap": ("galore",),
    "galore_scale": ("galore",),
    "galore_optim": ("galore",),
}
WHY_NOT = {
    ("galore", "qlora"): "GaLore trains full-rank weights, which a frozen 4-bit base cannot hold",
    ("rslora", "vera"): "VeRA has no alpha/r scaling to stabilise; it trains scaling vectors",
    ("init", "qlora"): "PiSSA/OLoRA rewrite the base weights, which are frozen 4-bit tensors in QLoRA",
}


class MethodConfig(_Section):
    name: Literal["lora", "dora", "qlora", "vera", "adalora", "loraplus", "full", "freeze", "galore"] = Field(
        "lora", description="Fine-tuning method; `tunesmith methods` says when to use which."
    )
    r: int = Field(16, ge=1, description="Adapter rank (LoRA family, VeRA; AdaLoRA uses init_r/target_r).")
    alpha: Number = Field(32.0, gt=0, description="LoRA alpha; the update is scaled by alpha / r (alpha / sqrt(r) with rslora).")
    dropout: Number = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    target_modules: Union[Literal["all-linear"], list[str]] = Field(
        "all-linear", description="`all-linear` (every linear layer but the lm_head) or a list of module names."
    )
    rslora: bool = Field(False, description="Rank-stabilised LoRA: scale by alpha / sqrt(r) instead of alpha / r.")
    init: Literal["default", "gaussian", "pissa", "olora"] = Field(
        "default", description="Adapter init: B = 0 (default), gaussian, or PiSSA/OLoRA from the base weights."
    )
    loraplus_lr_ratio: Optional[Number] = Field(
        None, gt=0, description="LoRA+: B matrices learn at lr * ratio (16 when method.name is loraplus)."
    )
    trainable_layers: Optional[int] = Field(
        None, ge=1, description="freeze: train only the last K transformer layers."
    )
    trainable_modules: Optional[list[str]] = Field(
        None, description="freeze: train only parameters whose name contains one of these strings."
    )
    init_r: int = Field(12, ge=1, description="AdaLoRA: starting rank of every adapted layer.")
    target_r: int = Field(8, ge=1, description="AdaLoRA: average rank left after pruning.")
    tinit: int = Field(0, ge=0, description="AdaLoRA: warm-up steps before pruning starts.")
    tfinal: int = Field(0, ge=0, description="AdaLoRA: final steps at the target budget.")
    delta_t: int = Field(1, ge=1, description="AdaLoRA: steps between two rank allocations.")
    orth_reg_weight: Number = Field(0.5, ge=0, description="AdaLoRA: weight of the orthogonality regulariser.")
    d_initial: Number = Field(0.1, gt=0, description="VeRA: initial value of the d scaling vector.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="QLoRA: 4-bit data type of the frozen base.")
    double_quant: bool = Field(True, description="QLoRA: quantize the quantization constants too (saves ~0.4 bit/param).")
    galore_rank: int = Field(128, ge=1, description="GaLore: rank of the gradient projection.")
    update_proj_gap: int = Field(200, ge=1, description="GaLore: steps between projection refreshes (SVD).")
    galore_scale: Number = Field(0.25, gt=0, description="GaLore: scale of the projected-back update.")
    galore_optim: Literal["galore_adamw", "galore_adafactor", "galore_adamw_layerwise"] = Field(
        "galore_adamw", description="GaLore optimizer variant."
    )

    @model_validator(mode="after")
    def _options_fit_the_method(self) -> "MethodConfig":
        for option in sorted(self.model_fields_set):
            allowed = OPTION_METHODS.get(option)
            if allowed is None or self.name in allowed:
                continue
            if getattr(self, option) == type(self).model_fields[option].default:
                continue  # a default written out (e.g. by `config show`) is not a choice
            why = WHY_NOT.get((option.split("_")[0], self.name)) or WHY_NOT.get((option, self.name))
            raise ValueError(
                f"method.{option} cannot be used with method.name={self.name}"
                + (f": {why}" if why else "")
                + f". It applies to {', '.join(allowed)}; remove it or change method.name"
            )
        if self.name == "adalora" and self.target_r > self.init_r:
            raise ValueError(f"method.target_r={self.target_r} must not exceed method.init_r={self.init_r}")
        if self.name == "freeze" and self.trainable_layers and self.trainable_modules:
            raise ValueError("method.trainable_layers and method.trainable_modules: set one of them, not both")
        return self


class TrainConfig(_Section):
    epochs: Number = Field(1.0, gt=0, description="Passes over the training data (ignored when max_steps > 0).")
    max_steps: int = Field(-1, description="Stop after this many optimizer steps; -1 means use epochs.")
    batch_size: int = Field(8, ge=1, description="Examples per micro batch.")
    grad_accum: int = Field(1, ge=1, description="Micro batches per optimizer step.")
    lr: Number = Field(2e-4, gt=0, description="Peak learning rate.")
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule after warmup."
    )
    warmup: Number = Field(
        0.03, ge=0, description="Warmup: a float < 1 is a share of all steps, a whole number >= 1 is a step count."
    )
    weight_decay: Number = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: Number = Field(1.0, ge=0, description="Gradient clipping norm (0 disables clipping).")
    bf16: Union[Literal["auto"], bool] = Field(
        "auto", description="bf16 autocast: `auto` turns it on where the CPU/GPU supports bf16."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    seed: int = Field(42, description="Seed for data order, adapter init and dropout.")
    logging_steps: int = Field(5, ge=1, description="Optimizer steps between log lines in metrics.jsonl.")
    save_steps: int = Field(100, ge=1, description="Optimizer steps between checkpoints (for --resume).")
    eval_each_epoch: bool = Field(True, description="Compute eval loss at the end of every epoch.")
    selective_loss: bool = Field(
        True, description="Compute logits only where a label is supervised, in chunks (same loss, less time and memory)."
    )
    padding_free: bool = Field(
        True, description="Put a micro batch in one row without padding; attention stays inside each example."
    )
    neftune_alpha: Optional[Number] = Field(
        None, gt=0, description="NEFTune: uniform noise on input embeddings scaled alpha/sqrt(L*d), training only (5 is typical)."
    )

    @field_validator("warmup")
    @classmethod
    def _whole_steps(cls, v: float) -> float:
        if v >= 1 and v != int(v):
            raise ValueError("a warmup >= 1 is a number of steps and must be whole (or use a share < 1)")
        return v


class EvalConfig(_Section):
    scorer: Literal["exact_match", "json_match", "contains"] = Field(
        "exact_match",
        description="How a generated answer is scored against the reference: exact text, equal JSON, or containment.",
    )
    max_new_tokens: int = Field(128, ge=1, description="Longest generated answer.")
    batch_size: int = Field(16, ge=1, description="Prompts generated together (left-padded).")
    limit: Optional[int] = Field(None, ge=1, description="Score only the first N eval examples.")


class RunConfig(_Section):
    model: str = Field("smollm2-135m-instruct", description="Built-in name, local folder, .gguf file or hub id.")
    trust_remote_code: bool = Field(False, description="Allow a model's own Python code to run when loading it.")
    data: DataConfig = Field(default_factory=DataConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output_dir: str = Field("runs/run", description="Where the adapter, checkpoints and reports are written.")

    @model_validator(mode="after")
    def _needs_train_data(self) -> "RunConfig":
        if not self.data.train:
            raise ValueError("data.train is required: a data file (.jsonl/.json/.csv/.parquet) or a hub dataset id")
        return self


def _field_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    paths = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        paths.append(path)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            paths.extend(_field_paths(ann, path + "."))
    return paths


def _nearest(path: str) -> str:
    candidates = _field_paths(RunConfig)
    leaf_matches = difflib.get_close_matches(path, candidates, n=1, cutoff=0.5)
    if leaf_matches:
        return f"; did you mean '{leaf_matches[0]}'?"
    return ""


def _key_path(loc: tuple) -> str:
    """The user's key path, without the union-member tags pydantic adds (`bool`, `literal['auto']`, `list[str]`)."""
    keys = []
    for part in loc:
        if isinstance(part, int):
            keys[-1:] = [f"{keys[-1]}[{part}]"] if keys else [f"[{part}]"]
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", part) and part not in ("str", "bool", "int", "float"):
            keys.append(part)
    return ".".join(keys)


def _format_validation_error(err: ValidationError, source: str) -> str:
    by_path: dict[str, list[str]] = {}
    values: dict[str, Any] = {}
    lines = []
    for e in err.errors():
        path = _key_path(e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key '{path}'{_nearest(path)}")
            continue
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "literal_error":
            msg = f"must be one of {e.get('ctx', {}).get('expected', '')}"
        if not path or isinstance(e.get("input"), dict):
            lines.append(f"{source}: {msg}")  # a rule across several keys; the message names them
            continue
        values[path] = e.get("input")
        if msg not in by_path.setdefault(path, []):
            by_path[path].append(msg)
    for path, msgs in by_path.items():
        lines.append(f"{source}: {path} = {values[path]!r} is invalid: {'; or '.join(msgs)}")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=1e-4` -> (["train", "lr"], 1e-4); the value is parsed as YAML."""
    if "=" not in text:
        raise TunesmithError(f"--set '{text}': expected KEY=VALUE, e.g. --set train.lr=1e-4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise TunesmithError(f"--set '{text}': the key is empty")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for item in overrides:
        keys, value = parse_override(item)
        node = raw
        for k in keys[:-1]:
            child = node.get(k)
            if child is None:
                child = node[k] = {}
            elif not isinstance(child, dict):
                raise TunesmithError(f"--set {item}: '{k}' is a value, not a section")
            node = child
        node[keys[-1]] = value
    return raw


def load_config(source: Union[str, Path, dict, None] = None, overrides: Optional[list[str]] = None) -> RunConfig:
    """Load a run config from a YAML file (relative data paths resolve against the file) or a dict."""
    base_dir: Optional[Path] = None
    if source is None:
        raw, name = {}, "config"
    elif isinstance(source, dict):
        raw, name = dict(source), "config"
    else:
        path = Path(source)
        if not path.is_file():
            raise TunesmithError(f"recipe '{source}' does not exist")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise TunesmithError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise TunesmithError(f"{path}: the top level must be a mapping of keys (model, data, method, train, ...)")
        name, base_dir = str(path), path.parent
    raw = apply_overrides(raw, overrides or [])
    try:
        config = RunConfig.model_validate(raw)
    except ValidationError as err:
        raise TunesmithError(_format_validation_error(err, name)) from None
    if base_dir is not None:
        _resolve_relative_paths(config, base_dir)
    return config


def _resolve_relative_paths(config: RunConfig, base: Path) -> None:
    """Data and template paths in a recipe are relative to the recipe, or to the working dir if they exist there."""

    def fix(p: str) -> str:
        if not p or Path(p).is_absolute() or Path(p).exists():
            return p
        candidate = base / p
        return str(candidate) if candidate.exists() else p

    d = config.data
    d.train = [fix(p) for p in d.train] if isinstance(d.train, list) else fix(d.train)
    if d.eval:
        d.eval = [fix(p) for p in d.eval] if isinstance(d.eval, list) else fix(d.eval)
    if d.chat_template and "{" not in d.chat_template:
        d.chat_template = fix(d.chat_template)


def config_to_yaml(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
