"""One datagen step as a YAML file, for `tunesmith datagen run SPEC.yaml`: `step` names the step, and the other
keys are that command's options under the same names (dashes written as underscores).

    step: self-instruct
    input: seeds.jsonl          # the step's input file (relative: next to the spec, or the working folder)
    out: generated.jsonl
    n: 200
    teacher: http://127.0.0.1:8000/v1
    max_tokens: 512

Validated like a run config (`yamlfile`): an unknown key, a key of another step or a bad value is one line
naming the spec, the key and what is valid.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from ..errors import TunesmithError
from ..yamlfile import Number, YamlSchema, apply_overrides, load_validated, read_yaml_mapping
from .augment import OPERATORS, AugmentOptions, augment
from .dedup import DedupOptions, dedup
from .evol import EvolOptions, evol
from .filtering import LANGUAGES, FilterOptions, filter_file
from .report import StepReport
from .selection import SelectOptions, select
from .self_instruct import SelfInstructOptions, self_instruct
from .teacher import DEFAULT_LOCAL_TEACHER, DEFAULT_MAX_TOKENS, MOST_MAX_TOKENS
from .teachers import TeacherSpec


class StepSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: str = Field(..., description="The step's input .jsonl (seed rows for self-instruct and evol).")
    out: str = Field(..., description="The output .jsonl.")


class TeacherStepSpec(StepSpec):
    teacher: str = Field(DEFAULT_LOCAL_TEACHER, description="An endpoint URL (http://host:port/v1) or a model.")
    model: Optional[str] = Field(None, description="Model name at the endpoint.")
    key_env: Optional[str] = Field(None, description="Environment variable holding the endpoint's API key.")
    concurrency: int = Field(4, ge=1, description="Requests in flight at once.")
    retries: int = Field(5, ge=0, description="Retries on 429, 5xx, timeouts and refused connections.")
    seed: int = 0
    max_tokens: int = Field(DEFAULT_MAX_TOKENS, ge=1, le=MOST_MAX_TOKENS, description="Most tokens per reply.")
    temperature: Number = Field(0.7, ge=0)

    def teacher_spec(self) -> TeacherSpec:
        return TeacherSpec(self.teacher, model=self.model, key_env=self.key_env, concurrency=self.concurrency,
                           retries=self.retries)


class SelfInstructSpec(TeacherStepSpec):
    step: Literal["self-instruct"]
    n: int = Field(100, ge=1, description="New instructions to add.")
    rouge_threshold: Number = Field(0.7, gt=0, le=1)
    top_p: Number = Field(0.5, gt=0, le=1)

    def run(self) -> StepReport:
        return self_instruct(self.input, self.out, self.teacher_spec(), SelfInstructOptions(
            n=self.n, seed=self.seed, rouge_threshold=self.rouge_threshold, max_tokens=self.max_tokens,
            temperature=self.temperature, top_p=self.top_p, batch=self.concurrency))


class EvolSpec(TeacherStepSpec):
    step: Literal["evol"]
    rounds: int = Field(1, ge=1)

    def run(self) -> StepReport:
        return evol(self.input, self.out, self.teacher_spec(), EvolOptions(
            rounds=self.rounds, seed=self.seed, max_tokens=self.max_tokens, temperature=self.temperature))


class AugmentSpec(TeacherStepSpec):
    step: Literal["augment"]
    ops: list[Literal[OPERATORS]] = Field(["paraphrase"], min_length=1)
    pivot: str = "French"

    def run(self) -> StepReport:
        return augment(self.input, self.out, self.teacher_spec(), AugmentOptions(
            ops=tuple(self.ops), pivot=self.pivot, seed=self.seed, max_tokens=self.max_tokens,
            temperature=self.temperature))


class DedupSpec(StepSpec):
    step: Literal["dedup"]
    threshold: Number = Field(0.8, gt=0, le=1, description="Jaccard similarity of near duplicates.")
    shingle: int = Field(3, ge=1, description="Words per shingle.")

    def run(self) -> StepReport:
        return dedup(self.input, self.out, DedupOptions(threshold=self.threshold, shingle=self.shingle))


class FilterSpec(StepSpec):
    step: Literal["filter"]
    tokenizer: str = DEFAULT_LOCAL_TEACHER
    min_tokens: int = Field(1, ge=0)
    max_tokens: int = Field(2048, ge=1)
    language: Literal[LANGUAGES] = "en"

    def run(self) -> StepReport:
        options = FilterOptions(min_tokens=self.min_tokens, max_tokens=self.max_tokens, language=self.language)
        return filter_file(self.input, self.out, options, model=self.tokenizer)


class SelectSpec(StepSpec):
    step: Literal["select"]
    n: int = Field(1000, ge=1)
    model: str = DEFAULT_LOCAL_TEACHER
    diversity: Number = Field(0.7, gt=0, le=1)

    def run(self) -> StepReport:
        return select(self.input, self.out, SelectOptions(n=self.n, diversity=self.diversity), model=self.model)


STEPS: dict[str, type[StepSpec]] = {"self-instruct": SelfInstructSpec, "evol": EvolSpec, "augment": AugmentSpec,
                                    "dedup": DedupSpec, "filter": FilterSpec, "select": SelectSpec}
AnySpec = Union[SelfInstructSpec, EvolSpec, AugmentSpec, DedupSpec, FilterSpec, SelectSpec]


def _schema(step: str, source: str) -> YamlSchema:
    """Errors name the spec file; a key that belongs to other steps says which."""
    own = set(STEPS[step].model_fields)
    elsewhere: dict[str, list[str]] = {}
    for name, model in STEPS.items():
        for key in set(model.model_fields) - own:
            elsewhere.setdefault(key, []).append(name)
    hints = {key: f"it is an option of {', '.join(steps)}, not of {step}" for key, steps in elsewhere.items()}
    return YamlSchema(STEPS[step], file_word="datagen spec", dict_name=source, keys_hint="step, input, out",
                      hints=hints)


def load_spec(path: Union[str, Path], overrides: Optional[list[str]] = None) -> AnySpec:
    """Validate a spec file; a relative `input` is found next to the spec when it is not in the working folder."""
    path = Path(path)
    raw = read_yaml_mapping(path, "datagen spec", "step, input, out")
    step = apply_overrides(copy.deepcopy(raw), overrides or []).get("step")
    if step not in STEPS:
        what = "has no 'step'" if step is None else f"step = {step!r} is invalid"
        raise TunesmithError(f"{path}: {what}; use one of {', '.join(STEPS)}")
    spec, _ = load_validated(_schema(step, str(path)), raw, overrides)
    if not Path(spec.input).is_absolute() and not Path(spec.input).exists() and (path.parent / spec.input).exists():
        spec.input = str(path.parent / spec.input)
    return spec


def run_spec(path: Union[str, Path], overrides: Optional[list[str]] = None) -> StepReport:
    return load_spec(path, overrides).run()
