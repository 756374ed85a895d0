"""A fine-tuning method as one registry entry: everything the rest of tunesmith asks about a method.

Config validation, `tunesmith methods`, the memory bill, the recommender, training, inference and export
read these fields instead of testing `method.name`. The entry is plain data plus functions, so `config.py`
and the CLI read it without importing torch; each function imports its heavy libraries when called.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

if TYPE_CHECKING:
    from .base import PreparedModel


@dataclass(frozen=True)
class AdapterSaves:
    """One adapted linear layer in a training step, as the bill sees it: what its adapter's activations cost."""

    tokens: int
    rank: int
    name: str  # the linear's name in its decoder layer, e.g. q_proj
    d_in: int
    d_out: int
    dropout: bool  # method.dropout > 0
    input_needs_grad: bool  # the layer's input is itself on the gradient path
    act_bytes: int  # bytes of one saved activation element
    mask_bytes: int  # bytes of one element of a saved dropout mask (CPU saves a float noise tensor)
    fused: bool  # train.fused_lora applies to this adapter (see Method.fused_lora)


@dataclass(frozen=True)
class Workspace:
    """A temporary the adapter allocates in the forward pass, beside what autograd saves: one bill line."""

    key: str  # the line's key in the bill (and its --json)
    label: str
    assumes: str
    why: str
    # (widest adapted d_in, bytes per activation element) -> (bytes, formula)
    size: Callable[[int, int], tuple[int, str]]


@dataclass(frozen=True)
class AdapterBill:
    """How the bill counts an adapter on one linear layer (d_in -> d_out) at rank r, in plain numbers."""

    formula: str  # trainable parameters per adapted linear, as the bill's detail line prints it
    # (rank, linear name, d_in, d_out) -> sizes of the trainable tensors the adapter adds to that linear
    tensors: Callable[[int, str, int, int], list[int]]
    # -> ({bill line: bytes} the adapter's autograd saves, whether the linear's input must be kept)
    saves: Callable[[AdapterSaves], tuple[dict[str, int], bool]]
    qv_note: bool = False  # the bill notes the count on every linear against q_proj and v_proj only (LoRA's r)
    workspace: Optional[Workspace] = None
    # fp32 values per trainable parameter the method keeps all run besides the optimizer's (AdaLoRA's rank
    # allocator: importance, its moving average and its uncertainty), and what they are
    state_per_param: int = 0
    state_what: str = ""


def no_load_kwargs(config) -> dict:
    return {}


def nothing_after_load(model) -> None:
    return None


def merge_and_unload(peft_model, run_dir: str):
    """PEFT's own merge: W + delta W in the precision the base was loaded in."""
    return peft_model.merge_and_unload()


def every_parameter(names: list[str], layers: int, method) -> tuple[set[str], str]:
    return set(names), "every parameter"


@dataclass(frozen=True)
class Method:
    """One fine-tuning method. Only `name`, `when`, `key_options`, `options` and `prepare` are required."""

    name: str  # method.name in a recipe
    when: str  # when to use it: its line in `tunesmith methods`
    key_options: str  # its options worth knowing, as `tunesmith methods` prints them
    options: tuple[str, ...]  # the method.* keys it accepts; config rejects any other one set for it, by name
    # (model, run config, planned optimizer steps) -> PreparedModel; imports torch/peft when called
    prepare: Callable[[Any, Any, int], "PreparedModel"]
    conflicts: Mapping[str, str] = field(default_factory=dict)  # option -> why this method cannot take it
    check: Optional[Callable[[Any], None]] = None  # a rule across its options (method section); raises ValueError
    rank_option: Optional[str] = "r"  # the option `plan --rank` sets; None: the method has no rank
    # (rank, default method section) -> options `--rank` also sets unless given (AdaLoRA: target_r)
    rank_extra: Optional[Callable[[int, Any], dict]] = None
    no_rank: str = "it trains the weights themselves"  # why `--rank` does not apply (rank_option None)
    lr: float = 2e-4  # peak learning rate the recommender writes into a recipe
    adapter: Optional[AdapterBill] = None  # None: the run folder holds a whole model, not an adapter
    # non-adapter methods: (parameter names, decoder layers, method section) -> (names that train, bill detail)
    trainable_base: Callable[[list[str], int, Any], tuple[set[str], str]] = every_parameter
    load_kwargs: Callable[[Any], dict] = no_load_kwargs  # extra from_pretrained arguments (QLoRA: 4-bit)
    after_load: Callable[[Any], None] = nothing_after_load  # on the loaded run model, before it is used
    merge: Callable[[Any, str], Any] = merge_and_unload  # (PeftModel of the run, run folder) -> plain model
    stacks: bool = False  # continual.previous: earlier runs' adapters stack under a new one
    quantized_base: bool = False  # the frozen base is 4-bit (method.quant_type, method.double_quant)
    fused_lora: bool = False  # train.fused_lora runs its branches (plain LoRA on full-precision linears)
    optimizer: Optional[str] = None  # the method brings its own optimizer (bill: optimizer states)
    warm_imports: tuple[str, ...] = ()  # modules `plan --measure` imports before reading the idle memory

    @property
    def saves_adapter(self) -> bool:
        return self.adapter is not None

    @property
    def takes_alpha(self) -> bool:
        """`plan --rank R` sets alpha = 2 R for methods that scale by alpha / r."""
        return "alpha" in self.options
