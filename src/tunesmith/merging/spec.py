"""The merge spec: one YAML file that says which models to merge, how, and into what dtype.

    method: ties
    base_model: smollm2-135m-instruct
    models:
      - model: runs/booking        # a run folder, a PEFT adapter folder, or a full model folder
        weight: 1.0
        density: 0.5
      - model: runs/shopping
    lambda: 1.0
    dtype: auto
    seed: 0

Errors name the key, the bad value and the fix, like the run config's.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..sizes import parse_size
from ..yamlfile import Number, YamlSchema, load_validated

METHODS = ("linear", "slerp", "task_arithmetic", "ties", "dare_linear", "dare_ties")
TASK_VECTOR_METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties")
SPARSE_METHODS = ("ties", "dare_linear", "dare_ties")
DARE_METHODS = ("dare_linear", "dare_ties")
DEFAULT_NORMALIZE = {"linear": True, "slerp": False, "task_arithmetic": False, "ties": True,
                     "dare_linear": False, "dare_ties": True}
DEFAULT_DENSITY = 0.5
Method = Literal["linear", "slerp", "task_arithmetic", "ties", "dare_linear", "dare_ties"]


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(..., description="A full model (built-in name, folder, hub id in the local cache), a run "
                                        "folder of `tunesmith train`, or a PEFT LoRA adapter folder.")
    weight: Optional[Number] = Field(
        None, description="This model's weight (default 1.0); negative subtracts its task vector. Not used by slerp."
    )
    density: Optional[Number] = Field(
        None, gt=0, le=1, description="Share of this model's task vector kept (ties, dare_*); default: the spec's density."
    )

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return {"model": value} if isinstance(value, str) else value


class MergeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    method: Method = Field(..., description="linear | slerp | task_arithmetic | ties | dare_linear | dare_ties.")
    base_model: Optional[str] = Field(
        None,
        description="The model task vectors are differences from (required for task_arithmetic, ties and dare_*); "
                    "also where config and tokenizer are copied from. Default for linear/slerp: the first model "
                    "(or the base the adapters were trained on).",
    )
    models: list[ModelEntry] = Field(..., min_length=1, description="The models to merge.")
    t: Optional[Union[Number, list[Number]]] = Field(
        None, description="slerp: 0 gives the first model, 1 the second (default 0.5); a list is a gradient "
                          "from the first layer to the last."
    )
    lambda_: Optional[Number] = Field(
        None, alias="lambda", description="task_arithmetic, ties, dare_*: scale of the merged task vector (default 1.0)."
    )
    normalize: Optional[bool] = Field(
        None, description="Divide by the sum of the weights. Defaults: linear, ties, dare_ties true; "
                          "task_arithmetic, dare_linear false."
    )
    density: Optional[Number] = Field(
        None, gt=0, le=1, description="ties, dare_*: share of each task vector kept (default 0.5); a model's own density wins."
    )
    rescale: Optional[Literal["inverse_density", "norm", "none"]] = Field(
        None, description="dare_*: rescale kept entries by 1/density (default, the paper's), to keep the L2 norm "
                          "(norm), or not at all (none)."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Output dtype; auto keeps each tensor's dtype in the base (or first) model."
    )
    seed: int = Field(0, description="Seed of DARE's random drops; the same seed gives the same merge.")
    max_shard_size: Union[int, str] = Field(
        "5GB", description="Largest output safetensors file; bigger outputs are sharded with an index."
    )

    @field_validator("t")
    @classmethod
    def _t_range(cls, v):
        values = v if isinstance(v, list) else [v]
        if isinstance(v, list) and not v:
            raise ValueError("a t gradient needs at least one value, e.g. [0.2, 0.8]")
        for x in values:
            if x is not None and not 0.0 <= x <= 1.0:
                raise ValueError("t must be between 0 (the first model) and 1 (the second)")
        return v

    @field_validator("max_shard_size")
    @classmethod
    def _size(cls, v):
        size = parse_size(v)
        if size <= 0:
            raise ValueError("must be positive, e.g. 2GB")
        return v

    @model_validator(mode="after")
    def _method_rules(self) -> "MergeSpec":
        m = self.method
        if m == "slerp" and len(self.models) != 2:
            raise ValueError(
                f"slerp interpolates between exactly two models, got {len(self.models)}; list both endpoints under "
                "`models` (the first is t=0, the second t=1), or use linear, task_arithmetic or ties for more models"
            )
        if m in TASK_VECTOR_METHODS and not self.base_model:
            raise ValueError(
                f"{m} merges task vectors (model - base), so it needs base_model: the model the others were "
                "fine-tuned from (for adapters or run folders, the model they were trained on, e.g. "
                "smollm2-135m-instruct)"
            )
        wrong = []
        if self.t is not None and m != "slerp":
            wrong.append(("t", "slerp"))
        if self.lambda_ is not None and m not in TASK_VECTOR_METHODS:
            wrong.append(("lambda", "task_arithmetic, ties, dare_linear and dare_ties"))
        if self.rescale is not None and m not in DARE_METHODS:
            wrong.append(("rescale", "dare_linear and dare_ties"))
        if self.density is not None and m not in SPARSE_METHODS:
            wrong.append(("density", "ties, dare_linear and dare_ties"))
        if self.normalize is not None and m == "slerp":
            wrong.append(("normalize", "linear, task_arithmetic, ties and dare_*"))
        for i, entry in enumerate(self.models):
            if entry.density is not None and m not in SPARSE_METHODS:
                wrong.append((f"models[{i}].density", "ties, dare_linear and dare_ties"))
            if entry.weight is not None and m == "slerp":
                wrong.append((f"models[{i}].weight", "every method but slerp (slerp uses t)"))
        if wrong:
            key, users = wrong[0]
            raise ValueError(f"`{key}` is not a {m} parameter (it is used by {users}); remove it")
        if self.effective_normalize and m != "ties" and m != "dare_ties":
            weights = self.weights()
            if weights and abs(sum(weights)) < 1e-12:
                raise ValueError(
                    f"the weights {weights} sum to zero, so normalize (dividing by their sum) is undefined; "
                    "change a weight, or set normalize: false"
                )
        return self

    # ---- effective values (defaults filled in per method) ----------------------------------------------
    def merged_models(self) -> list[ModelEntry]:
        """The models that contribute: for task-vector methods, an entry naming the base itself is skipped
        (mergekit-style specs list it; its task vector is zero)."""
        if self.method in TASK_VECTOR_METHODS:
            return [e for e in self.models if e.model != self.base_model]
        return list(self.models)

    def weights(self) -> list[float]:
        return [1.0 if e.weight is None else float(e.weight) for e in self.merged_models()]

    def densities(self) -> list[float]:
        default = DEFAULT_DENSITY if self.density is None else float(self.density)
        return [default if e.density is None else float(e.density) for e in self.merged_models()]

    @property
    def effective_normalize(self) -> bool:
        return DEFAULT_NORMALIZE[self.method] if self.normalize is None else self.normalize

    @property
    def effective_lambda(self) -> float:
        return 1.0 if self.lambda_ is None else float(self.lambda_)

    @property
    def effective_t(self) -> Union[float, list[float]]:
        return 0.5 if self.t is None else self.t

    @property
    def effective_rescale(self) -> str:
        return self.rescale or "inverse_density"

    def resolved(self) -> dict:
        """The spec with every default this method uses filled in (written into the output folder)."""
        m = self.method
        out: dict[str, Any] = {"method": m}
        if self.base_model:
            out["base_model"] = self.base_model
        models = []
        for e in self.models:
            row: dict[str, Any] = {"model": e.model}
            if m != "slerp":
                row["weight"] = 1.0 if e.weight is None else float(e.weight)
            if m in SPARSE_METHODS:
                row["density"] = float(e.density if e.density is not None else (self.density or DEFAULT_DENSITY))
            models.append(row)
        out["models"] = models
        if m == "slerp":
            out["t"] = self.effective_t
        else:
            out["normalize"] = self.effective_normalize
        if m in TASK_VECTOR_METHODS:
            out["lambda"] = self.effective_lambda
        if m in DARE_METHODS:
            out["rescale"] = self.effective_rescale
            out["seed"] = self.seed
        out["dtype"] = self.dtype
        out["max_shard_size"] = self.max_shard_size
        return out


# ---- loading ----------------------------------------------------------------------------------------------
_HINTS = {
    "parameters": "tunesmith takes method parameters at the top level (t, lambda, normalize, density, rescale) "
                  "and weight/density directly on each model, without a `parameters:` section",
    "merge_method": "did you mean 'method'?",
    "tokenizer_source": "the tokenizer and config always come from base_model (or the first model)",
}


SPEC = YamlSchema(MergeSpec, file_word="merge spec", dict_name="merge spec", keys_hint="method, base_model, models",
                  hints=_HINTS, entry_key="model")


def load_merge_spec(source: Union[str, Path, dict, MergeSpec], overrides: Optional[list[str]] = None) -> MergeSpec:
    """Load and validate a merge spec from a YAML file or a dict.

    Relative model paths resolve against the working directory, or against the spec's folder when they
    exist only there.
    """
    if isinstance(source, MergeSpec):
        if not overrides:
            return source
        source = source.model_dump(by_alias=True, exclude_none=True)
    spec, base_dir = load_validated(SPEC, source, overrides)
    if base_dir is not None:
        _resolve_relative(spec, base_dir)
    return spec


def _resolve_relative(spec: MergeSpec, base: Path) -> None:
    def fix(ref: Optional[str]) -> Optional[str]:
        if not ref or Path(ref).is_absolute() or Path(ref).exists():
            return ref
        candidate = base / ref
        return str(candidate) if candidate.exists() else ref

    base_before = spec.base_model
    spec.base_model = fix(spec.base_model)
    for e in spec.models:
        e.model = spec.base_model if (base_before and e.model == base_before) else fix(e.model)


def spec_to_yaml(spec: MergeSpec) -> str:
    return yaml.safe_dump(spec.resolved(), sort_keys=False, allow_unicode=True)
