"""A training setup as the bill sees it: sequence, batch, precision regime, optimizer, devices, loss."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..errors import TunesmithError
from ..methods import METHODS
from ..objectives import DEFAULT_OBJECTIVE, OBJECTIVES

PRECISIONS = ("fp32", "amp", "bf16", "pure-bf16")
# AdamW in fp32 or 8-bit, and each optimizer a method brings with it (GaLore's)
OPTIMIZERS = ("adamw", "adamw8bit") + tuple(m.optimizer for m in METHODS.values() if m.optimizer)
SELECTIVE_LOSS = "selective"  # tunesmith's chunked loss over the supervised rows
FULL_LOSS = "full"  # transformers' loss over every position (a loss, not method.name full)
LOSSES = (SELECTIVE_LOSS, FULL_LOSS)
LAYOUTS = ("padding_free", "padded")
REGIME_TEXT = {
    "fp32": "fp32 weights, gradients, AdamW moments and activations (tunesmith train with bf16 off)",
    "amp": "fp32 weights, gradients and moments; bf16 autocast activations (tunesmith train with bf16 on, "
           "methods that train the weights)",
    "bf16": "bf16 frozen weights, fp32 adapters and moments (tunesmith train with bf16 on, adapter methods); "
            "bf16 trainable weights with an fp32 master copy (DeepSpeed/FSDP mixed precision)",
    "pure-bf16": "bf16 weights, gradients and AdamW moments, no master copy",
}
CHUNK_TOKENS = 1024
DISTILL_CHUNK_ROWS = 512  # regularize/distill.py: rows per chunk of its KD + CE loss
EWC_TOKENS = 128  # regularize.ewc.chunk_tokens' default: tokens per Fisher example of general text
# How a preference run gets its reference log-probs (training/preference.py): the adapter-disabled model, or
# (weights that train) each pair scored once before training; a frozen copy of the model is the alternative
# the bill prices beside it.
REFERENCE_ADAPTER, REFERENCE_PRECOMPUTED, REFERENCE_COPY = "adapter disabled", "precomputed", "frozen copy"


def train_regime(bf16: bool, method: str) -> str:
    """The regime `tunesmith train` runs `method` in: with bf16 on, an adapter method's frozen base is stored
    in bf16 (methods.frozen_base_dtype) and a method that trains the weights keeps them fp32 under autocast."""
    if not bf16:
        return "fp32"
    return "bf16" if METHODS[method].saves_adapter else "amp"


@dataclass
class Setup:
    """Everything about a run except the model and the method."""

    seq_len: int = 2048
    batch: int = 1
    grad_accum: int = 1
    precision: str = "fp32"
    checkpointing: bool = False
    optimizer: str = "adamw"
    devices: int = 1
    zero: int = 0
    loss: str = SELECTIVE_LOSS  # selective: tunesmith's chunked loss over supervised rows; full: transformers' loss
    chunk_tokens: int = CHUNK_TOKENS
    supervised_share: float = 1.0  # share of next-token targets that carry loss (selective loss only)
    layout: str = "padding_free"  # padding_free: the micro batch in one row (tunesmith's default); padded
    padded: Optional[bool] = None  # padded layout: rows of different lengths (a mask); default: batch > 1
    device: str = "cpu"  # cpu | cuda: dropout masks, runtime overhead
    fused_lora: bool = True  # train.fused_lora: LoRA branches keep x, a 1-byte mask and A x (methods/fused_lora.py)
    packed_attention: bool = True  # padding-free rows: one causal sdpa call per example, no mask (train/attention.py)
    # train.objective: a preference objective makes every example a pair, chosen + rejected, each seq_len long
    objective: str = DEFAULT_OBJECTIVE
    # regularize.distill: a no-grad teacher pass and the KD loss per step (adapters switched off, or a frozen copy
    # of the model for methods without adapters)
    distill: bool = False
    # regularize.ewc: a diagonal Fisher from ewc_tokens-long examples before training, kept with the starting weights
    ewc: bool = False
    ewc_tokens: int = EWC_TOKENS

    def validate(self) -> "Setup":
        def bad(msg: str):
            raise TunesmithError(msg)

        if self.precision not in PRECISIONS:
            bad(f"precision '{self.precision}': use one of {', '.join(PRECISIONS)}")
        if self.optimizer not in OPTIMIZERS:
            bad(f"optimizer '{self.optimizer}': use one of {', '.join(OPTIMIZERS)}")
        if self.objective not in OBJECTIVES:
            bad(f"objective '{self.objective}': use one of {', '.join(OBJECTIVES)}")
        if self.loss not in LOSSES:
            bad(f"loss '{self.loss}': use selective or full")
        if self.layout not in LAYOUTS:
            bad(f"layout '{self.layout}': use padding_free or padded")
        if self.device not in ("cpu", "cuda"):
            bad(f"device '{self.device}': use cpu or cuda")
        if self.preference and (self.distill or self.ewc):
            bad(f"objective {self.objective} takes no regularizer (distill, ewc): plan it with objective sft")
        for name in ("seq_len", "batch", "grad_accum", "devices", "chunk_tokens", "ewc_tokens"):
            if getattr(self, name) < 1:
                bad(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.zero not in (0, 1, 2, 3):
            bad(f"zero stage {self.zero}: use 0 (DDP), 1, 2 or 3 (= FSDP full sharding)")
        if not 0 < self.supervised_share <= 1:
            bad("supervised_share must be in (0, 1]")
        return self

    @property
    def preference(self) -> bool:
        return OBJECTIVES[self.objective].preference

    @property
    def needs_reference(self) -> bool:
        return OBJECTIVES[self.objective].needs_reference

    @property
    def sequences(self) -> int:
        """Sequences in the micro batch: a preference pair is two (chosen and rejected, one forward pass)."""
        return self.batch * (2 if self.preference else 1)

    @property
    def tokens(self) -> int:
        return self.seq_len * self.sequences

    @property
    def is_padded(self) -> bool:
        """Does attention get a mask? Padded rows of different lengths, or several sequences in one row."""
        if self.layout == "padding_free":
            return self.sequences > 1
        return self.sequences > 1 if self.padded is None else self.padded

    @property
    def rows(self) -> tuple[int, int]:
        """(rows, row length) of the micro batch as the model sees it."""
        return (1, self.tokens) if self.layout == "padding_free" else (self.sequences, self.seq_len)

    @property
    def supervised(self) -> int:
        """Next-token targets that carry loss (each sequence's first token predicts nothing); for preference
        objectives the completion positions whose log-probs reach the lm_head."""
        return max(1, int(self.sequences * (self.seq_len - 1) * self.supervised_share))

    def shards(self, stage: int) -> bool:
        """Does ZeRO stage `stage` split this state across devices? Only from that stage on, and only
        when there is more than one device to split it across (one device keeps everything whole)."""
        return self.zero >= stage and self.devices > 1

    def per_device(self, n_bytes: int, stage: int) -> int:
        """`n_bytes` of a state that ZeRO stage `stage` shards: each device keeps its ceil share."""
        return -(-n_bytes // self.devices) if self.shards(stage) else n_bytes
