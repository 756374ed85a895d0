"""The lines of the memory bill: one function per line, each with its formula and the regime it assumes.

Regimes (`precision`), as bytes per value (`Widths`):

- ``fp32``: weights, gradients, AdamW moments and activations in fp32. What `tunesmith train` does
  when bf16 is off (this CPU: no AMX, so `train.bf16: auto` is off). 4 + 4 + 8 = 16 B per trainable
  parameter, 4 B per frozen one.
- ``amp``: what `tunesmith train` does with `train.bf16` on: fp32 weights, gradients and moments
  (16 B per trainable parameter), bf16 autocast activations. Autocast saves a bf16 copy of every
  weight it multiplies for the backward pass (2 B per linear parameter).
- ``bf16``: textbook mixed precision (DeepSpeed, FSDP MixedPrecision, the guide): bf16 weights and
  gradients, an fp32 master copy and fp32 moments: 2 + 2 + 4 + 4 + 4 = 16 B per trainable
  parameter, 2 B per frozen one. Adapters stay fp32 (PEFT upcasts them): 4 + 4 + 8 = 16 B.
- ``pure-bf16``: everything bf16, no master copy: 2 + 2 + 2 + 2 = 8 B per trainable parameter.

Each `phases` tuple says when a line is alive; `bill.py` adds the lines up per phase.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from ..config import MethodConfig
from ..sizes import GiB, MiB, fmt_bytes, fmt_count
from .activations import Activations, lm_head_trains
from .setup import (DISTILL_CHUNK_ROWS, FULL_LOSS, REFERENCE_ADAPTER, REFERENCE_COPY, REFERENCE_PRECOMPUTED,
                    REGIME_TEXT, Setup)
from .spec import ModelSpec
from .trainable import Trainability, galore_targets, trainability, trainable_params, trainable_tensors

NF4_BLOCK = 64  # bitsandbytes 4-bit block size (one absmax per 64 weights)
NESTED_BLOCK = 256  # double quantization: one fp32 absmax per 256 first-level absmax bytes
BNB8_BLOCK, BNB8_MIN = 256, 4096  # bitsandbytes 8-bit optimizers: block size, smaller tensors stay 32-bit
CUDA_CONTEXT = int(0.75 * GiB)  # CUDA context + cuBLAS/cuDNN workspaces, outside max_memory_allocated
# torch's CPU runtime once training runs: 13 MiB of OpenMP pools and library state, plus GEMM packing
# buffers that grow with the widest matmul (hidden x 16384 x 4 B); both measured on this machine
CPU_RUNTIME_BASE = 13 * MiB
CPU_GEMM_BUFFER = 16384 * 4
FORWARD_ONLY = ("forward",)  # phases of a forward-pass temporary (added to the forward phase only)


@dataclass
class Line:
    key: str
    label: str
    bytes: int
    formula: str
    assumes: str
    why: str
    phases: tuple[str, ...] = ()

    @property
    def gib(self) -> float:
        return self.bytes / GiB


@dataclass(frozen=True)
class Widths:
    """Bytes per value of each kind of state under one precision regime (see the module docstring)."""

    weight: int  # a frozen base weight
    trainable: int  # a trainable weight; its gradient has the same dtype
    master: int  # the fp32 master copy of a trainable weight, 0 when there is none
    moment: int  # one AdamW moment
    activation: int  # a saved matmul-path activation

    @property
    def grad(self) -> int:
        return self.trainable


def widths(precision: str, adapter: bool) -> Widths:
    """Adapters stay fp32 whatever the regime (PEFT upcasts them), so they never need a master copy."""
    weight = 4 if precision in ("fp32", "amp") else 2
    return Widths(
        weight=weight,
        trainable=4 if adapter else weight,
        master=4 if precision == "bf16" and not adapter else 0,
        moment=2 if precision == "pure-bf16" else 4,
        activation=4 if precision == "fp32" else 2,
    )


@dataclass
class Inputs:
    """What every line reads: the model, the method, the setup, and what trains."""

    spec: ModelSpec
    method: MethodConfig
    setup: Setup
    tr: Trainability
    tensors: list[int]  # sizes of the trainable tensors
    n_train: int
    widths: Widths

    @property
    def total(self) -> int:
        return self.spec.total_params


def bill_inputs(spec: ModelSpec, method: MethodConfig, setup: Setup) -> Inputs:
    tr = trainability(spec, method)
    return Inputs(spec, method, setup, tr, trainable_tensors(spec, tr), trainable_params(spec, tr),
                  widths(setup.precision, tr.is_adapter))


# ---- weights ----------------------------------------------------------------------------------
def nf4_bytes(n: int, double_quant: bool) -> int:
    """bitsandbytes 4-bit storage of n weights: packed nibbles, absmax per block, code tables."""
    blocks = -(-n // NF4_BLOCK)
    if double_quant:
        nested = -(-blocks // NESTED_BLOCK)
        return -(-n // 2) + blocks + nested * 4 + 4 + 256 * 4 + 16 * 4  # + offset, nested code, NF4 map
    return -(-n // 2) + blocks * 4 + 16 * 4


def _quantized_weights(x: Inputs) -> tuple[int, str, str]:
    """QLoRA: the decoder's linear weights in 4 bits, everything else at the regime's width."""
    spec, method, w = x.spec, x.method, x.widths
    quant = [math.prod(s) for n, s in spec.named_parameters() if n.startswith("model.layers.") and n.endswith("proj.weight")]
    q_params = sum(quant)
    q_bytes = sum(nf4_bytes(v, method.double_quant) for v in quant)
    other = x.total - q_params
    dq = "double-quantized" if method.double_quant else "fp32"
    formula = (f"{fmt_count(q_params)} linear weights in 4-bit {method.quant_type.upper()}: 0.5 B + {dq} absmax "
               f"per {NF4_BLOCK} ({'1 B + 4 B per 256 blocks' if method.double_quant else '4 B'}) = {fmt_bytes(q_bytes)}; "
               f"{fmt_count(other)} others (embeddings, norms{', lm_head' if not spec.tied else ''}) x {w.weight} B; "
               f"{fmt_count(x.n_train)} adapter x {w.trainable} B")
    assumes = f"bitsandbytes NF4 storage; non-linear weights at {'fp32' if w.weight == 4 else 'bf16'}"
    return q_bytes + other * w.weight + x.n_train * w.trainable, formula, assumes


def _plain_weights(x: Inputs) -> tuple[int, str, str]:
    """Frozen weights at the regime's width, trainable ones at theirs (adapters: fp32)."""
    w = x.widths
    adapter = x.tr.is_adapter
    n_frozen = x.total - (0 if adapter else x.n_train)
    formula = f"{fmt_count(x.total)} base parameters x {w.weight} B"
    if adapter:
        formula += f" + {fmt_count(x.n_train)} adapter x {w.trainable} B"
    return n_frozen * w.weight + x.n_train * w.trainable, formula, REGIME_TEXT[x.setup.precision]


def weights_line(x: Inputs) -> Line:
    n_bytes, formula, assumes = _quantized_weights(x) if x.tr.entry.quantized_base else _plain_weights(x)
    if x.setup.shards(3):
        formula += f"; / {x.setup.devices} devices (ZeRO-3/FSDP shards weights)"
    return Line("weights", "weights", x.setup.per_device(n_bytes, 3), formula, assumes,
                "The model's parameters stay in memory for the whole run; their dtype sets the bytes per parameter.",
                ("all",))


def trainable_line(x: Inputs) -> Line:
    return Line("trainable", f"trainable parameters: {x.n_train:,} ({100 * x.n_train / x.total:.3f}%)", 0,
                x.tr.detail, "exact count; PEFT's get_nb_trainable_parameters gives the same number",
                "Only these get gradients and optimizer states; everything else is frozen.", ())


# ---- gradients --------------------------------------------------------------------------------
def gradients_line(x: Inputs) -> Line:
    g_b = x.widths.grad
    layerwise = x.method.galore_optim == "galore_adamw_layerwise"  # config: only GaLore may set galore_optim
    if layerwise:
        count = max(x.tensors) if x.tensors else 0
        formula = f"largest tensor {fmt_count(count)} x {g_b} B (layer-wise: each gradient is freed after its update)"
    else:
        count = x.n_train
        formula = f"{fmt_count(count)} x {g_b} B"
    if x.setup.shards(2):
        formula += f" / {x.setup.devices} devices (ZeRO-2 shards gradients)"
    return Line("gradients", "gradients", x.setup.per_device(count * g_b, 2), formula,
                "bf16 gradients" if g_b == 2 else "fp32 gradients",
                "One gradient per trainable parameter, alive from the backward pass until the optimizer step "
                "(across all micro batches with gradient accumulation).", ("backward", "step"))


def ddp_buckets_line(x: Inputs) -> Optional[Line]:
    """Plain DDP (ZeRO-0) on several devices copies every gradient into a bucket."""
    if x.setup.zero or x.setup.devices == 1:
        return None
    g_b = x.widths.grad
    return Line("ddp_buckets", "DDP gradient buckets", x.n_train * g_b, f"{fmt_count(x.n_train)} x {g_b} B",
                "torch DDP default (gradient_as_bucket_view=False)",
                "DDP copies gradients into flat buckets for the all-reduce.", ("backward", "step"))


# ---- optimizer --------------------------------------------------------------------------------
@dataclass
class OptimizerCost:
    """The optimizer's states (alive all run) and its step temporaries, with their formulas."""

    states: int
    formula: str
    assumes: str
    step: int
    step_formula: str
    notes: tuple[str, ...] = ()


def _adamw(x: Inputs) -> OptimizerCost:
    mom_b, n_train = x.widths.moment, x.n_train
    formula = (f"{fmt_count(n_train)} x (4 + 4) B (exp_avg, exp_avg_sq)" if mom_b == 4 else
               f"{fmt_count(n_train)} x (2 + 2) B (bf16 moments)")
    assumes = "torch AdamW, fp32 moments" if mom_b == 4 else "AdamW with bf16 moments"
    # MethodTrainer's groups: >=2-D tensors (decay) and 1-D (no decay); foreach AdamW makes one
    # sqrt(exp_avg_sq) temporary for a whole group at once
    if x.tr.is_adapter:
        step = n_train * mom_b
    else:
        shapes = dict(x.spec.named_parameters())
        big = sum(math.prod(shapes[n]) for n in x.tr.base_names if len(shapes[n]) >= 2)
        step = max(big, n_train - big) * mom_b
    step_formula = (f"foreach AdamW: sqrt(exp_avg_sq) for the largest parameter group "
                    f"({fmt_count(step // mom_b)} x {mom_b} B)")
    return OptimizerCost(n_train * 2 * mom_b, formula, assumes, step, step_formula)


def _adamw8bit(x: Inputs) -> OptimizerCost:
    states = sum(v * 8 if v < BNB8_MIN else 2 * v + 2 * 4 * (-(-v // BNB8_BLOCK)) for v in x.tensors)
    formula = (f"{fmt_count(x.n_train)} x (1 + 1) B + an fp32 absmax per {BNB8_BLOCK} values "
               f"(tensors < {BNB8_MIN} stay 32-bit)")
    return OptimizerCost(states, formula, "bitsandbytes AdamW8bit, blockwise", 0,
                         "fused 8-bit kernel: no full-size temporaries")


def _galore(x: Inputs) -> OptimizerCost:
    spec, method = x.spec, x.method
    targets = galore_targets(spec, method)
    r = method.galore_rank
    adafactor = method.galore_optim == "galore_adafactor"
    states = proj = targeted = big_target = 0
    for t in targets:
        m_, n_ = t.out_features, t.in_features
        k = min(r, m_, n_)
        states += (k + max(m_, n_)) * 4 if adafactor else 2 * k * max(m_, n_) * 4
        proj += min(m_, n_) ** 2 * 4  # galore-torch keeps the whole SVD factor the projector slices
        targeted += m_ * n_
        big_target = max(big_target, m_ * n_)
    rest = x.total - targeted * spec.layers
    proj *= spec.layers
    states = states * spec.layers + rest * (4 if adafactor else 8) + proj
    formula = (f"targeted {len(targets)} x {spec.layers} matrices (m x n): moments 2 x rank x max(m, n) x 4 B with "
               f"rank {r}, plus the projector min(m, n)^2 x 4 B ({fmt_bytes(proj)}); other {fmt_count(rest)} "
               f"parameters x 8 B")
    note = ("galore-torch 1.0 slices the projector out of the full SVD factor, so each targeted matrix keeps "
            "min(m, n)^2 floats instead of rank x min(m, n): the bill counts what it really keeps.")
    largest_rest = max(spec.embed_params, spec.lm_head_params)
    step = max(2 * big_target * 4, 2 * largest_rest * 4)
    step_formula = ("per-tensor loop: update and projection back of the largest matrix (2 x m x n x 4 B) or "
                    "sqrt/denominator of the largest untargeted tensor (2 x n x 4 B)")
    return OptimizerCost(states, formula, f"galore-torch {method.galore_optim} (HF optim_target_modules)", step,
                         step_formula, (note,))


ADAM_COSTS = {"adamw": _adamw, "adamw8bit": _adamw8bit}


def optimizer_cost(x: Inputs) -> OptimizerCost:
    """The setup's optimizer, per device: ZeRO-1 and above shard its states and step temporaries.

    Any other optimizer is one a method brings (its entry's `optimizer`; bill.py checks the pair): GaLore's
    projected states, the only such optimizer so far.
    """
    cost = ADAM_COSTS.get(x.setup.optimizer, _galore)(x)
    if x.setup.shards(1):
        cost.states = x.setup.per_device(cost.states, 1)
        cost.formula += f" / {x.setup.devices} devices (ZeRO-1 shards optimizer states)"
        cost.step = x.setup.per_device(cost.step, 1)
    return cost


def optimizer_line(cost: OptimizerCost) -> Line:
    return Line("optimizer", "optimizer states", cost.states, cost.formula, cost.assumes,
                "Adam keeps two running averages per trainable parameter for the whole run.", ("all",))


def adapter_state_line(x: Inputs) -> Optional[Line]:
    """State an adapter method keeps beside the optimizer's (AdaLoRA's rank allocator)."""
    per = x.tr.adapter.state_per_param if x.tr.is_adapter else 0
    if not per:
        return None
    return Line("adapter_state", f"{x.method.name} state", x.n_train * per * 4,
                f"{fmt_count(x.n_train)} x {per} x 4 B", x.tr.adapter.state_what,
                "The method keeps its own statistics per trainable parameter for the whole run.", ("all",))


def master_line(x: Inputs) -> Line:
    master_b, p = x.widths.master, x.setup.precision
    if master_b:
        formula = f"{fmt_count(x.n_train)} x 4 B"
    elif p in ("fp32", "amp") or x.tr.is_adapter:
        formula = "none: the trainable weights are already fp32"
    else:
        formula = "none (pure bf16)"
    return Line("master", "fp32 master copies", x.setup.per_device(x.n_train * master_b, 1), formula, REGIME_TEXT[p],
                "Mixed precision updates an fp32 copy so that small updates are not lost in bf16.", ("all",))


def step_workspace_line(cost: OptimizerCost) -> Line:
    return Line("step_workspace", "optimizer step workspace", cost.step, cost.step_formula, "transient",
                "The optimizer's temporaries during the update.", ("step",))


# ---- activations and logits -------------------------------------------------------------------
ACTIVATION_ASSUMES = {
    "fp32": "fp32 activations",
    "amp": "bf16 matmul activations, fp32 residual stream (approximate)",
    "bf16": "bf16 activations, fp32 norm statistics (approximate)",
    "pure-bf16": "bf16 activations, fp32 norm statistics (approximate)",
}


def activations_line(x: Inputs, act: Activations) -> Line:
    spec, setup = x.spec, x.setup
    attn = "sdpa (flash kernel: no s x s matrix)" if spec.attention == "sdpa" else "eager attention (s x s scores saved)"
    formula = f"{act.formula}; micro batch {setup.batch} x {setup.seq_len} tokens; {attn}"
    if setup.layout == "padded" and setup.is_padded and spec.kv_heads < spec.heads:
        formula += "; padded batch: k/v repeated for the mask"
    if setup.layout == "padding_free" and setup.sequences > 1 and setup.packed_attention and spec.attention == "sdpa":
        formula += "; packed rows: attention per example"
    assumes = ACTIVATION_ASSUMES[setup.precision] + ("; with gradient checkpointing" if setup.checkpointing
                                                     else "; no checkpointing")
    return Line("activations", "activations (saved for backward)", act.saved - act.logits_saved, formula, assumes,
                "Every op keeps the inputs its backward needs until the backward pass reaches it.",
                ("forward", "backward"))


def autocast_copies_line(x: Inputs) -> Optional[Line]:
    """amp only: autocast's bf16 copy of each weight it multiplies, kept for the backward pass."""
    if x.setup.precision != "amp":
        return None
    spec, qlora = x.spec, x.tr.entry.quantized_base
    # 4-bit linears dequantize inside bitsandbytes and save only the packed weight;
    # with checkpointing only the layer being recomputed keeps its copies
    layers_kept = 1 if x.setup.checkpointing else spec.layers
    linear = 0 if qlora else layers_kept * spec.layer_linear_params
    return Line("autocast_copies", "autocast bf16 weight copies", (linear + spec.vocab * spec.hidden) * 2,
                ("the lm_head" if qlora else "every linear weight and the lm_head") + " x 2 B, saved for the backward pass",
                "amp", "Autocast casts each fp32 weight to bf16 for the matmul and autograd keeps that copy.",
                ("forward", "backward"))


def logits_line(x: Inputs, act: Activations) -> Line:
    spec, setup = x.spec, x.setup
    if act.loss == FULL_LOSS:
        formula = (f"3 x {setup.tokens:,} positions x {spec.vocab:,} vocab x 4 B (log-softmax saved + nll and "
                   "log-softmax gradients)")
        assumes = "transformers' cross-entropy over every position"
        if setup.loss != FULL_LOSS:
            assumes += " (tunesmith falls back to it for AdaLoRA and soft-capped logits)"
    elif setup.preference:
        act_b = x.widths.activation
        rows = setup.supervised
        chunk = min(setup.chunk_tokens, rows)
        formula = (f"{rows:,} completion rows of {setup.sequences} sequences (chosen + rejected per pair) x "
                   f"({spec.hidden} x {act_b} B hidden states kept + their gradient, 8 B target) + 2 x chunk of "
                   f"{chunk:,} rows x {spec.vocab:,} vocab x 4 B")
        if act.logits_transient > rows * spec.hidden * act_b + 2 * chunk * spec.vocab * 4:
            formula += " + lm_head gradient 2 x vocab x hidden x 4 B"
        assumes = "tunesmith's chunked completion log-probs (training/preference.py): only completion positions"
    else:
        act_b = x.widths.activation
        rows = setup.supervised
        chunk = min(setup.chunk_tokens, rows)
        formula = (f"{rows:,} supervised rows x {spec.hidden} x {act_b} B (hidden gradients kept) x 2 + 3 x chunk of "
                   f"{chunk:,} rows x {spec.vocab:,} vocab x 4 B")
        if act.logits_saved > rows * spec.hidden * act_b:
            formula += " + lm_head gradient 2 x vocab x hidden x 4 B"
        assumes = "tunesmith's selective chunked cross-entropy (train.selective_loss, the default)"
    return Line("logits", "logits and loss buffers", act.logits_saved + act.logits_transient, formula, assumes,
                "The loss turns each position into a vocabulary-sized fp32 row; only the supervised rows, "
                "one chunk at a time, with the selective loss.", ("forward", "backward"))


# ---- the reference of a preference objective ----------------------------------------------------
def reference_mode(x: Inputs) -> str:
    """What `tunesmith train` uses (training/preference.reference_mode): an adapter method's model with its
    adapter disabled; otherwise every pair scored once before training, never a frozen copy."""
    return REFERENCE_ADAPTER if x.tr.is_adapter else REFERENCE_PRECOMPUTED


def frozen_copy_bytes(x: Inputs) -> int:
    """A second, frozen copy of the model as loaded (the alternative to precomputing)."""
    return x.setup.per_device(x.total * x.widths.weight, 3)


def reference_line(x: Inputs, forward: int) -> Optional[Line]:
    """The reference pass: a forward without autograd. Adapter disabled: no extra weights; precomputed: that
    pass runs over the training pairs before the first step, and the step only reads 2 floats per pair."""
    if not x.setup.needs_reference:
        return None
    mode, copy = reference_mode(x), frozen_copy_bytes(x)
    formula = (f"{x.setup.objective}: no-grad forward of {x.setup.tokens:,} tokens (one layer's working set, final "
               f"hidden states, chunked log-probs) = {fmt_bytes(forward)}")
    if mode == REFERENCE_ADAPTER:
        formula = "the trained model with its adapter disabled (no second copy); " + formula
    else:
        formula = (f"{REFERENCE_PRECOMPUTED}: each pair scored once before training (2 x 4 B per pair in the step); "
                   f"a {REFERENCE_COPY} would hold {fmt_count(x.total)} x {x.widths.weight} B = {fmt_bytes(copy)} "
                   f"more all run; " + formula)
    return Line("reference", f"reference model ({mode})", forward, formula,
                f"what tunesmith train chooses: {mode} (training/preference.py)",
                "Preference objectives compare the policy's log-probs with the starting model's.", ("reference",))


# ---- regularizers (regularize.distill, regularize.ewc) ----------------------------------------------
DISTILL_BUFFERS = 4  # chunk x vocab fp32 buffers alive at once in regularize/distill.py's loop
EWC_PENALTY_TEMPS = 3  # (theta - theta_ref), its square, times F: per tensor while the penalty is summed


def teacher_copy_line(x: Inputs) -> Optional[Line]:
    """Distillation with a method that has no adapters to switch off keeps a frozen copy of the starting model."""
    if not x.setup.distill or x.tr.is_adapter:
        return None
    return Line("teacher_copy", "distillation teacher (frozen copy)", frozen_copy_bytes(x),
                f"{fmt_count(x.total)} x {x.widths.weight} B",
                f"regularize.distill with method {x.method.name} (no adapters to switch off)",
                "The teacher is the model as training started; without adapters to switch off that is a second copy.",
                ("all",))


def distill_line(x: Inputs, body: int) -> Optional[Line]:
    """The teacher pass and the KD loss, each while the student's saved activations wait for backward."""
    if not x.setup.distill:
        return None
    spec, ab = x.spec, x.widths.activation
    rows = x.setup.supervised
    chunk = min(DISTILL_CHUNK_ROWS, rows)
    head_grad = spec.vocab * spec.hidden * 4 if lm_head_trains(spec, x.tr) else 0
    kd = 3 * rows * spec.hidden * ab + DISTILL_BUFFERS * chunk * spec.vocab * 4 + head_grad
    formula = (f"the larger of the teacher's no-grad pass over {x.setup.tokens:,} tokens (one layer's working set and "
               f"its final hidden states) = {fmt_bytes(body)} and the KD loss: {rows:,} supervised rows x "
               f"{spec.hidden} x {ab} B x 3 (student rows, teacher rows, their gradient) + {DISTILL_BUFFERS} x chunk of "
               f"{chunk:,} rows x {spec.vocab:,} vocab x 4 B" + (" + lm_head gradient vocab x hidden x 4 B" if head_grad
                                                                 else "") + f" = {fmt_bytes(kd)}")
    teacher = "the model with its adapters switched off" if x.tr.is_adapter else "the frozen copy"
    return Line("distill", "distillation teacher pass and KD loss", max(body, kd), formula,
                f"regularize.distill: teacher = {teacher} (regularize/distill.py)",
                "Distillation runs the teacher on every micro batch and compares both next-token distributions.",
                ("distill",))


def ewc_state_line(x: Inputs) -> Optional[Line]:
    if not x.setup.ewc:
        return None
    return Line("ewc_state", "EWC Fisher and starting weights", 2 * x.n_train * 4,
                f"2 x {fmt_count(x.n_train)} trainable x 4 B (diagonal Fisher + starting values, fp32)",
                "regularize.ewc (regularize/ewc.py)",
                "EWC pulls every trainable parameter toward its starting value, weighted by its Fisher: both are "
                "kept for the whole run.", ("all",))


def ewc_penalty_bytes(x: Inputs) -> int:
    """The penalty's temporaries in the loss: a few fp32 copies of one trainable tensor at a time."""
    return EWC_PENALTY_TEMPS * max(x.tensors, default=0) * 4 if x.setup.ewc else 0


def ewc_fisher_line(x: Inputs, one: Optional[Activations]) -> Optional[Line]:
    """Before training: one reference example's forward and backward at a time, in eval mode, full logits."""
    if not x.setup.ewc or one is None:
        return None
    example = one.saved + one.logits_transient
    n_bytes = 2 * x.n_train * 4 + example
    formula = (f"Fisher accumulators and one example's gradients 2 x {fmt_count(x.n_train)} x 4 B + one "
               f"{x.setup.ewc_tokens}-token example's activations with its full logits = {fmt_bytes(example)}")
    return Line("ewc_fisher", "EWC Fisher pass (before training)", n_bytes, formula,
                "regularize.ewc: per-example squared gradients (no optimizer states yet)",
                "The Fisher needs each reference example's own gradient, so examples go through one at a time.",
                ("fisher",))


# ---- workspaces -------------------------------------------------------------------------------
def adapter_workspace_line(x: Inputs) -> Optional[Line]:
    """A forward-pass temporary the method's adapter declares (DoRA: an identity matrix)."""
    ws = x.tr.adapter.workspace if x.tr.is_adapter else None
    if ws is None:
        return None
    n_bytes, formula = ws.size(max(t.in_features for t in x.tr.targets), x.widths.activation)
    return Line(ws.key, ws.label, n_bytes, formula, ws.assumes, ws.why, FORWARD_ONLY)


def backward_workspace_line(x: Inputs) -> Line:
    spec, g_b = x.spec, x.widths.grad
    n_bytes = 0
    parts = []
    if x.tr.trains("model.embed_tokens.weight"):
        n_bytes = 2 * spec.embed_params * g_b
        parts.append(f"embedding's dense gradient 2 x {fmt_count(spec.embed_params)} x {g_b} B")
    if x.tr.entry.quantized_base:
        biggest = max(l.in_features * l.out_features for l in spec.linears)
        fp32_cpu = x.setup.precision in ("fp32", "amp") and x.setup.device == "cpu"
        n_bytes = max(n_bytes, biggest * (4 if fp32_cpu else 2))
        parts.append("one dequantized 4-bit weight at a time")
    return Line("backward_workspace", "backward workspace", n_bytes, "; ".join(parts) or "none worth counting",
                "transient", "Temporaries of the backward pass beyond the saved tensors.", ("backward",))


def gather_line(x: Inputs) -> Optional[Line]:
    """ZeRO-3/FSDP on several devices: each layer's full weights are gathered (one device has them all)."""
    if not x.setup.shards(3):
        return None
    spec, w_b = x.spec, x.widths.weight
    return Line("gather", "ZeRO-3/FSDP all-gather buffers", 2 * spec.layer_params * w_b,
                f"2 layers x {fmt_count(spec.layer_params)} x {w_b} B (current + prefetched)",
                "FSDP full sharding", "Each layer's full weights are gathered just before use.", ("forward", "backward"))


def overhead_line(x: Inputs) -> Line:
    spec, device = x.spec, x.setup.device
    if device == "cuda":
        n_bytes = CUDA_CONTEXT
        formula = "CUDA context + cuBLAS/cuDNN workspaces (~0.75 GiB, estimate; not in torch.cuda.max_memory_allocated)"
    else:
        n_bytes = CPU_RUNTIME_BASE + spec.hidden * CPU_GEMM_BUFFER
        formula = (f"torch CPU runtime: 13 MiB (OpenMP pools, library state) + GEMM packing buffers hidden x 16384 x 4 B "
                   f"= {fmt_bytes(spec.hidden * CPU_GEMM_BUFFER)} (both measured on this 2-core CPU)")
    return Line("overhead", "runtime overhead", n_bytes, formula, device, "Memory the framework needs besides tensors.",
                ("all",))
