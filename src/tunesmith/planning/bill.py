"""The memory bill: pure arithmetic on a model's config for one training setup, line by line.

Every line (`lines.py`) carries its formula and the precision regime it assumes. The peak is not the
sum of all lines: gradients, activations and the optimizer's temporaries live at different moments of
a step, so the bill adds up each moment (phase) and the total is the largest one.

Activations are the tensors autograd saves for the backward pass, enumerated per decoder layer
for the transformers implementation of each family (`activations.py`); tests compare the count
with what autograd really saves on small models of each family.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Optional

from ..config import MethodConfig
from ..errors import TunesmithError
from ..methods import METHODS, get_method
from ..sizes import SIZE_HELP, GiB, MiB, SizeError, fmt_bytes, parse_size
from .activations import Activations, activations, no_grad_body, no_grad_forward
from .lines import (
    ADAM_COSTS,
    adapter_state_line,
    FORWARD_ONLY,
    Inputs,
    Line,
    activations_line,
    adapter_workspace_line,
    autocast_copies_line,
    backward_workspace_line,
    bill_inputs,
    ddp_buckets_line,
    distill_line,
    ewc_fisher_line,
    ewc_penalty_bytes,
    ewc_state_line,
    gather_line,
    gradients_line,
    logits_line,
    master_line,
    optimizer_cost,
    optimizer_line,
    frozen_copy_bytes,
    overhead_line,
    reference_line,
    reference_mode,
    step_workspace_line,
    teacher_copy_line,
    trainable_line,
    weights_line,
)
from .setup import FULL_LOSS, REFERENCE_ADAPTER, REFERENCE_COPY, Setup
from .spec import load_spec


@dataclass
class Bill:
    model: str
    method: str
    setup: dict
    spec: dict
    total_params: int
    trainable_params: int
    trainable_detail: str
    lines: list[Line]
    phases: dict[str, int]
    peak_phase: str
    peak: int  # what the measurement sees: max over phases (+ CPU runtime on CPU)
    total: int  # peak + overhead not seen by the measurement (CUDA context)
    budget: Optional[int] = None
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> Optional[bool]:
        return None if self.budget is None else self.total <= self.budget

    def line(self, key: str) -> Line:
        for l in self.lines:
            if l.key == key:
                return l
        raise KeyError(key)

    def as_dict(self) -> dict:
        return {
            "model": self.model,
            "method": self.method,
            "setup": self.setup,
            "spec": self.spec,
            "total_params": self.total_params,
            "trainable_params": self.trainable_params,
            "trainable_detail": self.trainable_detail,
            "lines": [{**asdict(l), "gib": round(l.gib, 4)} for l in self.lines],
            "phases": {k: {"bytes": v, "gib": round(v / GiB, 4)} for k, v in self.phases.items()},
            "peak_phase": self.peak_phase,
            "peak_bytes": self.peak,
            "total_bytes": self.total,
            "total_gib": round(self.total / GiB, 3),
            "budget_bytes": self.budget,
            "fits": self.fits,
            "notes": self.notes,
        }


def parse_budget(budget) -> int:
    """Memory per device in bytes (the convention of `tunesmith.sizes`). A budget under 1 MiB is a
    forgotten unit (`--budget 24` is 24 bytes), so it is refused with the units spelled out."""
    n = parse_size(budget, "budget")
    if n < MiB:
        raise SizeError(f"budget {budget!r} is {n:,} bytes, too small to train anything: {SIZE_HELP}")
    return n


def _method(method: MethodConfig | dict | str | None) -> MethodConfig:
    if method is None:
        return MethodConfig()
    if isinstance(method, str):
        return MethodConfig(name=method)
    if isinstance(method, dict):
        return MethodConfig(**method)
    return method


def _setup(setup: Optional[Setup], method: MethodConfig) -> Setup:
    """A method that brings its own optimizer (GaLore) sets it; that optimizer without its method is an error."""
    setup = (setup or Setup()).validate()
    own = get_method(method.name).optimizer
    if own is not None:
        setup.optimizer = own
    elif setup.optimizer not in ADAM_COSTS:
        owner = next(m.name for m in METHODS.values() if m.optimizer == setup.optimizer)
        raise TunesmithError(f"optimizer {setup.optimizer} is method {owner}: set --method {owner} "
                             "(the method brings its own optimizer)")
    return setup


def check_objective(x: Inputs) -> None:
    """What config and training refuse for a preference objective, refused here in the same words."""
    s = x.setup
    if not s.preference:
        return
    if s.loss == FULL_LOSS:
        raise TunesmithError(f"objective {s.objective} scores completions with the chunked log-probs, never "
                             "transformers' full loss: drop --loss full")
    if x.spec.final_softcap:
        raise TunesmithError(f"objective {s.objective} needs logits that are exactly lm_head(hidden); {x.spec.name} "
                             "soft-caps its logits: plan it with objective sft")


def check_regularizers(x: Inputs) -> None:
    """config refuses distill and ewc without the selective loss (they are loss terms on its hidden states)."""
    s = x.setup
    if (s.distill or s.ewc) and s.loss == FULL_LOSS:
        raise TunesmithError("distill and ewc add loss terms to tunesmith's selective loss, which --loss full does "
                             "not use: plan them with --loss selective")


def fisher_activations(x: Inputs) -> Activations | None:
    """What one EWC reference example saves: batch 1, no checkpointing (eval mode), transformers' full logits."""
    if not x.setup.ewc:
        return None
    one = replace(x.setup, seq_len=x.setup.ewc_tokens, batch=1, grad_accum=1, checkpointing=False, loss=FULL_LOSS,
                  layout="padded", padded=False, distill=False, ewc=False)
    return activations(x.spec, x.tr, one)


def phases(x: Inputs, lines: list[Line], act: Activations) -> dict[str, int]:
    """Bytes alive at each moment of a training step; the peak is the largest."""
    spec, setup, tr = x.spec, x.setup, x.tr
    get = {l.key: l.bytes for l in lines}
    # all-run state besides weights and optimizer: the method's own, the regularizers'
    kept = get.get("adapter_state", 0) + get.get("teacher_copy", 0) + get.get("ewc_state", 0)
    base = get["weights"] + get["optimizer"] + get["master"] + get.get("gather", 0) + kept
    grads = get["gradients"] + get.get("ddp_buckets", 0)
    grads_kept = grads if setup.grad_accum > 1 else 0  # accumulated over the micro batches, alive in forward
    amp_copies = get.get("autocast_copies", 0)
    head_grad = 0
    if tr.trains("lm_head.weight") or (spec.tied and tr.trains("model.embed_tokens.weight")):
        head_grad = spec.vocab * spec.hidden * x.widths.grad
    saved = act.saved + amp_copies
    forward_only = sum(l.bytes for l in lines if l.phases == FORWARD_ONLY)  # e.g. DoRA's identity matrix
    out = {
        "loss": base + grads_kept + saved + max(act.logits_transient, ewc_penalty_bytes(x)),
        "forward": base + grads_kept + saved - act.logits_saved + forward_only,
        "end of backward": base + grads + get["backward_workspace"],
        "optimizer step": base + grads + get["step_workspace"],
    }
    if head_grad and not grads_kept and act.loss == FULL_LOSS:
        out["lm_head backward"] = base + head_grad + saved
    if "reference" in get:
        if reference_mode(x) == REFERENCE_ADAPTER:  # first in the step, before the policy saves anything
            out["reference forward"] = base + grads_kept + get["reference"]
        else:  # before training: the model as loaded, no gradients or optimizer states yet
            out["reference pass (before training)"] = get["weights"] + get.get("gather", 0) + get["reference"]
    if "distill" in get:  # after the student's forward and SFT loss, before backward
        out["distill (teacher pass, KD loss)"] = base + grads_kept + saved + get["distill"]
    if "ewc_fisher" in get:  # before training: no optimizer states, gradients or starting values yet
        out["EWC Fisher (before training)"] = (get["weights"] + get.get("gather", 0) + get.get("teacher_copy", 0)
                                               + get["ewc_fisher"])
    if setup.checkpointing:
        out["recompute (checkpointing)"] = (base + max(grads_kept, head_grad) + act.checkpoint_inputs + act.layer_bytes
                                            + amp_copies)
    return out


def notes(x: Inputs) -> list[str]:
    """What a reader of the bill should know about this method and regime."""
    spec, method = x.spec, x.method
    out = []
    if x.tr.is_adapter and x.tr.adapter.qv_note:
        qv = [l for l in spec.linears if l.name in ("q_proj", "v_proj")]
        n_all = sum(method.r * (l.in_features + l.out_features) for l in spec.linears) * spec.layers
        n_qv = sum(method.r * (l.in_features + l.out_features) for l in qv) * spec.layers
        if qv:
            out.append(f"LoRA r={method.r} on this model: every linear layer ({len(spec.linears)} per layer) "
                       f"{n_all:,} parameters; q_proj and v_proj only {n_qv:,}.")
    if x.setup.needs_reference and reference_mode(x) != REFERENCE_ADAPTER:
        out.append(f"reference: tunesmith train scores every pair once before training instead of keeping a "
                   f"{REFERENCE_COPY} of the model ({fmt_bytes(frozen_copy_bytes(x))} more for the whole run); "
                   "that pass costs one forward over the training pairs.")
    p = x.setup.precision
    if p == "pure-bf16" or (p == "bf16" and not x.tr.is_adapter):
        out.append("tunesmith train keeps weights that train in fp32 (bf16 only as autocast): plan it with precision "
                   "amp (or fp32); this regime describes DeepSpeed/FSDP-style runs.")
    elif p == "amp" and x.tr.is_adapter:
        out.append("tunesmith train stores an adapter method's frozen base in bf16 when bf16 is on: plan it with "
                   "precision bf16.")
    return out


def compute_bill(model, method: MethodConfig | dict | str | None = None, setup: Setup | None = None,
                 budget=None) -> Bill:
    """The memory bill of training `model` with `method` under `setup` (see Setup)."""
    method = _method(method)
    x = bill_inputs(load_spec(model), method, _setup(setup, method))
    check_objective(x)
    check_regularizers(x)
    act = activations(x.spec, x.tr, x.setup)
    cost = optimizer_cost(x)
    overhead = overhead_line(x)
    candidates = (weights_line(x), trainable_line(x), gradients_line(x), ddp_buckets_line(x), optimizer_line(cost),
                  master_line(x), adapter_state_line(x), activations_line(x, act), autocast_copies_line(x), logits_line(x, act),
                  adapter_workspace_line(x), backward_workspace_line(x), step_workspace_line(cost), gather_line(x),
                  reference_line(x, no_grad_forward(x.spec, x.tr, x.setup)), teacher_copy_line(x),
                  distill_line(x, no_grad_body(x.spec, x.tr, x.setup)), ewc_state_line(x),
                  ewc_fisher_line(x, fisher_activations(x)), overhead)
    lines = [l for l in candidates if l is not None]
    by_phase = phases(x, lines, act)
    peak_phase = max(by_phase, key=by_phase.get)
    return Bill(
        model=x.spec.name,
        method=method.name,
        setup=asdict(x.setup),
        spec=x.spec.summary(),
        total_params=x.total,
        trainable_params=x.n_train,
        trainable_detail=x.tr.detail,
        lines=lines,
        phases=by_phase,
        peak_phase=peak_phase,
        peak=by_phase[peak_phase] + (overhead.bytes if x.setup.device == "cpu" else 0),
        total=by_phase[peak_phase] + overhead.bytes,
        budget=parse_budget(budget) if budget is not None else None,
        notes=[*cost.notes, *notes(x)],
    )
