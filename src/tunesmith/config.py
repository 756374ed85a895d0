"""The run config: one YAML file, validated by pydantic, with defaults a beginner can trust.

Every error names the key path, the bad value and the fix; unknown keys get the nearest valid name.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from .methods.registry import DEFAULT_METHOD, METHODS, methods_accepting, methods_with
from .objectives.registry import DEFAULT_OBJECTIVE, OBJECTIVES, objectives_accepting
from .yamlfile import Number, YamlSchema, load_validated


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
    weights: Optional[list[Number]] = Field(
        None,
        description="Weighted mixing: one weight per data.train entry; each dataset's share of the training examples "
        "is its weight / sum of weights (smaller ones are repeated, larger ones subsampled), spread evenly through training.",
    )
    task_prefix: Optional[Union[str, list[Optional[str]]]] = Field(
        None,
        description="Text put before the first user message, e.g. `[Translation]`: one for all data, or one per "
        "data.train entry (applied the same way in training, eval and chat; `--adapter auto` routes by it).",
    )

    @model_validator(mode="before")
    @classmethod
    def _train_entries_with_options(cls, raw: Any) -> Any:
        """`train: [{path: a.jsonl, weight: 3, task_prefix: "[A]"}, b.jsonl]` -> train, weights, task_prefix lists."""
        if not isinstance(raw, dict) or not isinstance(raw.get("train"), list):
            return raw
        entries = raw["train"]
        if not any(isinstance(e, dict) for e in entries):
            return raw
        raw = dict(raw)
        paths, weights, prefixes = [], [], []
        for i, e in enumerate(entries):
            if isinstance(e, dict):
                unknown = sorted(set(e) - {"path", "weight", "task_prefix"})
                if unknown or "path" not in e:
                    raise ValueError(
                        f"data.train[{i}] = {e!r}: an entry is a path, or a mapping with 'path' and optional 'weight' "
                        "and 'task_prefix'" + (f" (unknown: {', '.join(unknown)})" if unknown else "")
                    )
                paths.append(e["path"])
                weights.append(e.get("weight", 1.0))
                prefixes.append(e.get("task_prefix"))
            else:
                paths.append(e)
                weights.append(1.0)
                prefixes.append(None)
        raw["train"] = paths
        if any(isinstance(e, dict) and "weight" in e for e in entries):
            if raw.get("weights") is not None:
                raise ValueError("data.weights: give the weights either in data.train entries or in data.weights, not both")
            raw["weights"] = weights
        if any(p is not None for p in prefixes):
            if raw.get("task_prefix") is not None:
                raise ValueError("data.task_prefix: give prefixes either in data.train entries or in data.task_prefix, not both")
            raw["task_prefix"] = prefixes
        return raw

    @model_validator(mode="after")
    def _per_dataset_lists_fit(self) -> "DataConfig":
        n = len(self.train) if isinstance(self.train, list) else 1
        if self.weights is not None:
            if len(self.weights) != n:
                raise ValueError(f"data.weights has {len(self.weights)} entries but data.train has {n}; give one weight per dataset")
            if any(w <= 0 for w in self.weights):
                raise ValueError(f"data.weights = {self.weights}: every weight must be > 0 (remove a dataset instead of weighting it 0)")
        if isinstance(self.task_prefix, list) and len(self.task_prefix) != n:
            raise ValueError(
                f"data.task_prefix has {len(self.task_prefix)} entries but data.train has {n}; give one per dataset "
                "(null for none) or a single string for all"
            )
        return self


METHOD_NAMES = tuple(METHODS)  # methods/registry.py: one entry per method module


class MethodConfig(_Section):
    name: Literal[METHOD_NAMES] = Field(
        DEFAULT_METHOD, description="Fine-tuning method; `tunesmith methods` says when to use which."
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
        """Each option set must be one the method's registry entry accepts; then the entry's own rule."""
        entry = METHODS[self.name]
        for option in sorted(self.model_fields_set - {"name"}):
            if option in entry.options:
                continue
            if getattr(self, option) == type(self).model_fields[option].default:
                continue  # a default written out (e.g. by `config show`) is not a choice
            why = entry.conflicts.get(option)
            raise ValueError(
                f"method.{option} cannot be used with method.name={self.name}"
                + (f": {why}" if why else "")
                + f". It applies to {', '.join(methods_accepting(option))}; remove it or change method.name"
            )
        if entry.check is not None:
            entry.check(self)
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
    eval_steps: Optional[int] = Field(
        None, ge=1, description="Also compute eval loss every N optimizer steps (instead of once per epoch)."
    )
    keep_best: Optional[Literal["eval_loss", "score"]] = Field(
        None, description="Keep the checkpoint with the lowest eval loss (or highest task score, by greedy generation "
        "at each evaluation) as the run's adapter; the last weights go to last/. A checkpoint is saved at each evaluation."
    )
    save_total_limit: int = Field(2, ge=1, description="Checkpoints kept in the run folder (the best one is always kept).")
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list, description="Also log metrics to these trackers (TensorBoard writes to RUN/tensorboard/)."
    )
    doctor: bool = Field(
        True, description="Watch training for the guide's failure modes (NaN loss, flat loss, exploding gradients, "
        "overfitting); stops on NaN/Inf at the last good checkpoint. Findings go to doctor.json."
    )
    selective_loss: bool = Field(
        True, description="Compute logits only where a label is supervised, in chunks (same loss, less time and memory)."
    )
    order: Literal["random", "group_by_length", "sequential"] = Field(
        "random", description="Example order: shuffled; shuffled with similar lengths batched together (less padding "
        "when train.padding_free is false, nothing saved otherwise, and it trains on runs of one length: one seed in "
        "three scored 78% on the shopping task against 95-98% shuffled, bench/learning.py); or as in the file."
    )
    padding_free: bool = Field(
        True, description="Put a micro batch in one row without padding; attention stays inside each example."
    )
    fused_lora: bool = Field(
        True, description="Run LoRA and DoRA branches as one autograd step that keeps no dropped-out copies of the "
        "input and, for DoRA, no W0 + sBA (same math and adapter as PEFT, less memory); false uses PEFT's own forward."
    )
    num_threads: int = Field(
        0, ge=0, description="CPU threads for torch's math; 0 keeps torch's default of one per core. On a shared "
        "CPU, cores divided by the number of training processes keeps them from slowing each other (bench/cpu_sharing.py)."
    )
    compile: bool = Field(
        False, description="torch.compile each decoder layer (guide §8.3.3). Off by default: on the CPU quickstart "
        "run it did not pay back its compile time (README, bench/compile.py); try it on a GPU and long runs."
    )
    neftune_alpha: Optional[Number] = Field(
        None, gt=0, description="NEFTune: uniform noise on input embeddings scaled alpha/sqrt(L*d), training only (5 is typical)."
    )
    objective: Literal[tuple(OBJECTIVES)] = Field(
        DEFAULT_OBJECTIVE, description="sft: learn the answers; dpo, orpo, simpo: learn which of two answers to prefer "
        "from prompt/chosen/rejected rows (options in the `preference:` section)."
    )

    @field_validator("warmup")
    @classmethod
    def _whole_steps(cls, v: float) -> float:
        if v >= 1 and v != int(v):
            raise ValueError("a warmup >= 1 is a number of steps and must be whole (or use a share < 1)")
        return v

    @model_validator(mode="after")
    def _best_needs_evaluation(self) -> "TrainConfig":
        if self.keep_best and not (self.eval_steps or self.eval_each_epoch):
            raise ValueError(f"train.keep_best={self.keep_best} compares evaluations, but train.eval_steps is unset and "
                             "train.eval_each_epoch is false; set train.eval_steps (e.g. 50) or eval_each_epoch: true")
        return self


class EvalConfig(_Section):
    scorer: Literal["exact_match", "json_match", "contains"] = Field(
        "exact_match",
        description="How a generated answer is scored against the reference: exact text, equal JSON, or containment.",
    )
    max_new_tokens: int = Field(128, ge=1, description="Longest generated answer.")
    batch_size: int = Field(16, ge=1, description="Prompts generated together (left-padded).")
    limit: Optional[int] = Field(None, ge=1, description="Score only the first N eval examples.")
    general_tokens: int = Field(
        4096, ge=64, description="eval --forgetting: tokens of held-out general text (Python reference docs) for the general perplexity."
    )


class ReplayConfig(_Section):
    ratio: Number = Field(
        0.05, gt=0.0, lt=1.0,
        description="Exact share of training examples taken from the replay source, spread evenly through training.",
    )
    source: Union[str, list[str]] = Field(
        "general",
        description="`general`: the Python reference text (pydoc_data), never its held-out part that eval --forgetting "
        "measures; or data file(s) in any supported format.",
    )
    chunk_tokens: Optional[int] = Field(
        None, ge=8,
        description="`general` source: tokens per replay example; default: the task examples' median supervised tokens, "
        "so the ratio is also the share of the loss.",
    )


class DistillConfig(_Section):
    alpha: Number = Field(
        0.9, ge=0.0, le=1.0,
        description="loss = alpha * SFT + (1 - alpha) * KD, KD = T^2 * KL(base || trained) on the supervised positions. "
        "0.9 (with T 2) kept 94% of LoRA's task score at +1.1% general perplexity on the built-in model; 0.5 cost 20 "
        "points of task score (recipes/distill.yaml has the sweep).",
    )
    temperature: Number = Field(2.0, gt=0.0, description="Softmax temperature T of both distributions.")


class EWCConfig(_Section):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    lambda_: Number = Field(
        1.0e5, ge=0.0, alias="lambda",
        description="Penalty lambda/2 * sum F * (theta - theta_ref)^2 over the trainable parameters. It depends on the "
        "Fisher's scale (summary.json: regularize.ewc.fisher_sum): on the built-in model with LoRA, 1e5 kept the task "
        "score and the general perplexity (+0.5%), 1e3 barely constrained (recipes/ewc.yaml has the sweep).",
    )
    reference: Union[str, list[str]] = Field(
        "general",
        description="Data for the Fisher: `general` (Python reference text) or data file(s), e.g. the previous task's.",
    )
    samples: int = Field(64, ge=1, description="Reference examples; one forward and backward each.")
    chunk_tokens: int = Field(128, ge=8, description="`general` reference: tokens per example.")

    @model_serializer(mode="wrap")
    def _dump_as_lambda(self, handler):
        out = handler(self)
        return {("lambda" if k == "lambda_" else k): v for k, v in out.items()} if isinstance(out, dict) else out


class PreferenceConfig(_Section):
    """Options of the preference objectives (train.objective dpo, orpo, simpo); each entry says which it takes."""

    beta: Optional[Number] = Field(
        None, gt=0, description="dpo: how far from the reference (smaller drifts further; default 0.1); orpo: weight "
        "lambda of the odds-ratio term (default 0.1); simpo: reward scale (default 2.0)."
    )
    label_smoothing: Number = Field(
        0.0, ge=0.0, lt=0.5, description="dpo: share of preference labels assumed flipped (conservative DPO; 0.1 is typical)."
    )
    loss: Literal["sigmoid", "ipo"] = Field(
        "sigmoid", description="dpo: sigmoid (the DPO paper) or ipo (squared loss on length-normalised log-ratios)."
    )
    gamma: Number = Field(0.5, ge=0.0, description="simpo: target reward margin between chosen and rejected.")


class RegularizeConfig(_Section):
    replay: Optional[ReplayConfig] = Field(None, description="Mix general (or other) data into training: `replay: {ratio: 0.05}`.")
    distill: Optional[DistillConfig] = Field(None, description="Distil from the frozen base: `distill: {alpha: 0.5, temperature: 2}`.")
    ewc: Optional[EWCConfig] = Field(None, description="Elastic weight consolidation: `ewc: {lambda: 1000}`.")


class ContinualConfig(_Section):
    previous: list[str] = Field(
        default_factory=list, description="Earlier runs of a task sequence, oldest first (their adapters are reused)."
    )
    strategy: Literal["progressive", "o-lora", "merge", "separate"] = Field(
        "progressive",
        description="progressive: earlier adapters frozen and active, a new one on top; o-lora: the same plus an "
        "orthogonality penalty on the A matrices; merge: fold earlier adapters into the base first; separate: an "
        "independent adapter per task (pick one with --adapter).",
    )
    orthogonal_lambda: Number = Field(0.5, ge=0.0, description="o-lora: weight of sum ||A_old A_new^T||^2.")


class DistributedConfig(_Section):
    """How `tunesmith train --nproc N` (torchrun) spreads one run over processes; one process ignores it."""

    strategy: Literal["ddp", "fsdp", "deepspeed"] = Field(
        "ddp",
        description="ddp: every process keeps the whole model and averages gradients (the fastest while the model "
        "fits on one device; right for LoRA); fsdp: torch's FSDP2 shards the model across processes; deepspeed: "
        "DeepSpeed ZeRO (needs the deepspeed package).",
    )
    zero_stage: Literal[2, 3] = Field(
        3, description="fsdp/deepspeed: 2 shards gradients and optimizer states, 3 the weights too (least memory)."
    )
    offload: bool = Field(
        False, description="fsdp/deepspeed: keep sharded state in CPU memory between uses (fits more, runs slower)."
    )

    @model_validator(mode="after")
    def _sharding_options_need_sharding(self) -> "DistributedConfig":
        chosen = sorted(k for k in self.model_fields_set - {"strategy"}
                        if getattr(self, k) != type(self).model_fields[k].default)
        if self.strategy == "ddp" and chosen:
            raise ValueError(f"distributed.{chosen[0]} applies to strategy fsdp or deepspeed, not ddp (which shards "
                             "nothing); remove it or set distributed.strategy")
        return self


class RunConfig(_Section):
    model: str = Field("smollm2-135m-instruct", description="Built-in name, local folder, .gguf file or hub id.")
    trust_remote_code: bool = Field(False, description="Allow a model's own Python code to run when loading it.")
    data: DataConfig = Field(default_factory=DataConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    regularize: RegularizeConfig = Field(default_factory=RegularizeConfig)
    continual: ContinualConfig = Field(default_factory=ContinualConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig)
    output_dir: str = Field("runs/run", description="Where the adapter, checkpoints and reports are written.")

    @model_validator(mode="after")
    def _needs_train_data(self) -> "RunConfig":
        if not self.data.train:
            raise ValueError("data.train is required: a data file (.jsonl/.json/.csv/.parquet) or a hub dataset id")
        return self

    @model_validator(mode="after")
    def _preference_options_fit(self) -> "RunConfig":
        """preference.* options only with an objective that reads them; preference data with what it supports."""
        objective = OBJECTIVES[self.train.objective]
        p = self.preference
        for option in sorted(p.model_fields_set):
            if getattr(p, option) == type(p).model_fields[option].default:
                continue  # a default written out (e.g. by `config show`) is not a choice
            if not objective.preference or (option != "beta" and option not in objective.options):
                takers = [n for n, e in OBJECTIVES.items() if e.preference] if option == "beta" else objectives_accepting(option)
                raise ValueError(f"preference.{option} cannot be used with train.objective={self.train.objective}; it "
                                 f"applies to {', '.join(takers)}: remove it or change train.objective")
        if p.loss == "ipo" and p.label_smoothing:
            raise ValueError("preference.label_smoothing applies to preference.loss: sigmoid (conservative DPO), not "
                             "ipo; remove one of them")
        if objective.preference:
            unsupported = [key for key, used in (
                ("data.weights", self.data.weights is not None),
                ("data.task_prefix", bool(self.data.task_prefix)),
                ("data.format", self.data.format != "auto"),  # preference rows are detected per row
                ("regularize.replay", self.regularize.replay is not None),
                ("regularize.distill", self.regularize.distill is not None),
                ("regularize.ewc", self.regularize.ewc is not None),
                # merge folds the earlier adapters into the base, so the adapter-disabled reference is the earlier
                # run's model (SFT, then DPO against it); other strategies' earlier adapters would leave the reference
                ("continual.previous with a strategy other than merge",
                 bool(self.continual.previous) and self.continual.strategy != "merge"),
                ("train.neftune_alpha", self.train.neftune_alpha is not None),
            ) if used]
            if unsupported:
                raise ValueError(f"{', '.join(unsupported)}: not supported with train.objective={self.train.objective} "
                                 "(preference pairs); remove it or train with objective sft")
        return self

    @model_validator(mode="after")
    def _regularizers_fit(self) -> "RunConfig":
        r = self.regularize
        needs_loss = [f"regularize.{k}" for k in ("distill", "ewc") if getattr(r, k) is not None]
        if self.continual.previous and self.continual.strategy == "o-lora":
            needs_loss.append("continual.strategy=o-lora")
        entry = METHODS[self.method.name]
        if needs_loss and not self.train.selective_loss:
            raise ValueError(f"{', '.join(needs_loss)}: these add loss terms to the selective loss; set "
                             "train.selective_loss: true")
        if self.continual.previous and not entry.stacks:
            raise ValueError(
                f"continual.previous needs method.name {' or '.join(methods_with('stacks'))} (adapters that stack), "
                f"got {self.method.name}"
            )
        return self


# Names users bring from transformers' TrainingArguments, TRL's SFTConfig and PEFT's LoraConfig.
_HF_NAMES = {
    "learning_rate": "train.lr", "per_device_train_batch_size": "train.batch_size", "num_train_epochs": "train.epochs",
    "gradient_accumulation_steps": "train.grad_accum", "max_steps": "train.max_steps", "warmup_steps": "train.warmup",
    "warmup_ratio": "train.warmup", "weight_decay": "train.weight_decay", "seed": "train.seed",
    "lora_r": "method.r", "lora_alpha": "method.alpha", "lora_dropout": "method.dropout",
    "max_seq_length": "data.max_length", "max_length": "data.max_length", "model_name_or_path": "model",
    "output_dir": "output_dir", "per_device_eval_batch_size": "eval.batch_size",
}
RECIPE = YamlSchema(RunConfig, file_word="recipe", dict_name="config", keys_hint="model, data, method, train",
                    hints={k: f"did you mean '{v}'? (tunesmith's name for {k})" for k, v in _HF_NAMES.items()})


def load_config(source: Union[str, Path, dict, None] = None, overrides: Optional[list[str]] = None) -> RunConfig:
    """Load a run config from a YAML file (relative data paths resolve against the file) or a dict."""
    config, base_dir = load_validated(RECIPE, source, overrides)
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

    config.model = _resolve_model_path(config.model, base)
    d = config.data
    d.train = [fix(p) for p in d.train] if isinstance(d.train, list) else fix(d.train)
    if d.eval:
        d.eval = [fix(p) for p in d.eval] if isinstance(d.eval, list) else fix(d.eval)
    if d.chat_template and "{" not in d.chat_template:
        d.chat_template = fix(d.chat_template)
    fix_all = lambda v: [fix(p) for p in v] if isinstance(v, list) else (v if v == "general" else fix(v))  # noqa: E731
    r = config.regularize
    if r.replay is not None:
        r.replay.source = fix_all(r.replay.source)
    if r.ewc is not None:
        r.ewc.reference = fix_all(r.ewc.reference)
    if config.continual.previous:
        config.continual.previous = [fix(p) for p in config.continual.previous]


def _resolve_model_path(model: str, base: Path) -> str:
    """A model folder or .gguf next to the recipe is found like its data; a path that exists nowhere but is
    written as one (`./x`, `../x`, `x.gguf`) becomes the place next to the recipe, which the error then names."""
    if Path(model).is_absolute() or Path(model).exists():
        return model
    candidate = base.absolute() / model
    if candidate.exists() or model.startswith(("./", "../")) or model.endswith(".gguf"):
        return str(candidate)
    return model


def config_to_yaml(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
