"""Which adapters serve each row of a batch: one stack activated for all rows, or one adapter per row.

A stack is the tuple of PEFT adapter names that serve a task (routing.py: a continual run's task may need
several, e.g. ("task1", "default")); () serves the base model, None the model as loaded. A batch whose rows
want different stacks runs as one PEFT mixed batch (`generate(adapter_names=[one name per row])`), which
applies exactly one LoRA adapter per row: a stack of several LoRA adapters gets one concatenated adapter
(PEFT's `add_weighted_adapter(combination_type="cat")`, rank = the sum of ranks, the exact sum of their
updates), checked against the stack itself on a probe input before it is used. Adapters PEFT cannot mix
(DoRA, non-LoRA methods) are served one stack at a time.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from peft import LoraConfig

from ..methods.adapter_stack import activate, using_adapters

BASE = "__base__"  # PEFT's adapter name for "no adapter" in a mixed batch
PROBE = torch.arange(1, 17).unsqueeze(0)  # token ids every vocabulary has


@dataclass
class Group:
    """Rows generated together, with the generate() arguments and context that apply their adapters."""

    rows: list
    kwargs: dict = field(default_factory=dict)
    context: object = None


class AdapterSet:
    def __init__(self, model):
        self.model = model
        self.peft = callable(getattr(model, "load_adapter", None)) and hasattr(model, "peft_config")
        self.as_loaded: tuple[str, ...] = tuple(model.base_model.active_adapters) if self.peft else ()
        self.combined: dict[tuple[str, ...], str] = {}

    def resolve(self, stack: tuple[str, ...] | None) -> tuple[str, ...]:
        return self.as_loaded if stack is None else stack

    def _mixable_one(self, name: str) -> bool:
        config = self.model.peft_config.get(name)
        return isinstance(config, LoraConfig) and not config.use_dora

    def mixable(self, stack: tuple[str, ...]) -> bool:
        if not self.peft or not stack:
            return True
        return self._mixable_one(stack[0]) if len(stack) == 1 else stack in self.combined

    def row_name(self, stack: tuple[str, ...]) -> str:
        if not stack:
            return BASE
        return stack[0] if len(stack) == 1 else self.combined[stack]

    def prepare(self, stacks) -> None:
        """One verified concatenated adapter for each multi-adapter stack of mixable LoRA adapters."""
        if not self.peft:
            return
        for stack in {self.resolve(s) for s in stacks}:
            if len(stack) > 1 and stack not in self.combined and all(self._mixable_one(n) for n in stack):
                self._combine(stack)

    def _combine(self, stack: tuple[str, ...]) -> None:
        name = "stack__" + "__".join(stack)
        before = list(self.model.base_model.active_adapters)
        try:
            self.model.base_model.add_weighted_adapter(list(stack), [1.0] * len(stack), name, combination_type="cat")
        except ValueError:  # PEFT cannot concatenate these (e.g. modules_to_save on one module): serve unmixed
            return
        finally:
            activate(self.model, before)
        self.model.eval()  # PEFT adds the new adapter's modules in training mode: its dropout would be on
        with torch.inference_mode():
            with using_adapters(self.model, list(stack)):
                want = self.model(input_ids=PROBE).logits
            got = self.model(input_ids=PROBE, adapter_names=[name]).logits
        if torch.allclose(got, want, atol=1e-4, rtol=1e-4):
            self.combined[stack] = name
        else:
            self.model.base_model.delete_adapter(name)
            activate(self.model, before)

    def using(self, stack: tuple[str, ...]):
        """A context that serves every row with `stack`, exactly as chat and eval switch adapters."""
        if not self.peft:
            return contextlib.nullcontext()
        if not stack:
            return self.model.disable_adapter()
        return using_adapters(self.model, list(stack))

    def groups(self, rows) -> list[Group]:
        """The generate() calls that serve `rows`: one when they share a stack or PEFT can mix them."""
        stacks = [self.resolve(r.stack) for r in rows]
        if len(set(stacks)) == 1:
            return [Group(rows, {}, self.using(stacks[0]))]
        if all(self.mixable(s) for s in stacks):
            return [Group(rows, {"adapter_names": [self.row_name(s) for s in stacks]}, contextlib.nullcontext())]
        by_stack: dict[tuple[str, ...], list] = {}
        for row, stack in zip(rows, stacks):
            by_stack.setdefault(stack, []).append(row)
        return [Group(group, {}, self.using(stack)) for stack, group in by_stack.items()]
