"""The recommender: the guide's decision tree (§8.2), walked with the bill's real numbers.

The guide decides by fixed thresholds (>= 80 GB: full; >= 24 GB: LoRA r=16-64 for multi-task;
>= 16 GB: LoRA r=8-16; else QLoRA), whatever the model and sequence length. Here each branch is
priced with `compute_bill` for this model and setup, in the order the guide prefers:

    full fine-tuning  ->  LoRA (multi-task: r=64/32/16, one task: r=16/8)  ->  QLoRA (r=16/8)

For each method the largest micro batch (8, 4, 2, 1) that fits is chosen without gradient
checkpointing first (it costs ~30% more compute), then with it; gradient accumulation brings the
effective batch to 16 (the guide's 16-32). A plan fits when its total stays under the budget
minus a headroom share (default 10%) for what a bill cannot see (allocator fragmentation, an
unusually long batch). GaLore is priced too and reported, but the tree never prefers it over LoRA.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Optional

import yaml

from ..config import MethodConfig, load_config
from ..methods import full, galore, get_method, lora, qlora
from ..sizes import fmt_bytes
from .bill import Bill, compute_bill, parse_budget
from .configs import recipe_model_ref
from .setup import Setup, train_regime
from .spec import load_spec

MICRO_BATCHES = (8, 4, 2, 1)
EFFECTIVE_BATCH = 16
# the guide's tree names these four methods; everything else about them comes from their registry entries
FULL, LORA, QLORA, GALORE = (module.METHOD.name for module in (full, lora, qlora, galore))


@dataclass
class Option:
    label: str
    method: MethodConfig
    bill: Optional[Bill]  # the best-fitting setup, or the smallest one when nothing fits
    fits: bool
    reason: str


@dataclass
class Recommendation:
    model: str
    budget: int
    headroom: float
    chosen: Optional[Option]
    options: list[Option] = field(default_factory=list)
    recipe: Optional[dict] = None

    @property
    def yaml(self) -> str:
        if self.recipe is None:
            return ""
        head = (f"# tunesmith plan: {self.chosen.label} on {self.model}, {fmt_bytes(self.chosen.bill.total)} "
                f"of {fmt_bytes(self.budget)} ({self.chosen.bill.peak_phase} is the peak)\n"
                "# point data.train at your data, then: tunesmith train THIS_FILE\n")
        return head + yaml.safe_dump(self.recipe, sort_keys=False)

    def as_dict(self) -> dict:
        return {
            "model": self.model,
            "budget_bytes": self.budget,
            "headroom": self.headroom,
            "chosen": self.chosen.label if self.chosen else None,
            "recipe": self.recipe,
            "options": [
                {"label": o.label, "method": o.method.name, "fits": o.fits, "reason": o.reason,
                 "total_bytes": o.bill.total if o.bill else None,
                 "setup": o.bill.setup if o.bill else None}
                for o in self.options
            ],
        }


def _best_setup(model, method: MethodConfig, base: Setup, limit: int) -> tuple[Optional[Bill], Bill]:
    """The fitting bill with the largest micro batch (no checkpointing first), and the smallest bill."""
    smallest: Optional[Bill] = None
    for ckpt in (False, True):
        for b in MICRO_BATCHES:
            s = Setup(**{**base.__dict__, "batch": b, "checkpointing": ckpt,
                         "grad_accum": max(1, math.ceil(EFFECTIVE_BATCH / (b * base.devices)))})
            bill = compute_bill(model, method, s)
            if smallest is None or bill.total <= smallest.total:
                smallest = bill
            if bill.total <= limit:
                return bill, smallest
    assert smallest is not None
    return None, smallest


def _describe(bill: Bill) -> str:
    s = bill.setup
    return (f"micro batch {s['batch']} x grad_accum {s['grad_accum']}"
            + (", gradient checkpointing" if s["checkpointing"] else ""))


def recommend(model, budget, *, seq_len: int = 2048, multi_task: bool = False, precision: str = "fp32",
              device: str = "cpu", devices: int = 1, zero: int = 0, headroom: float = 0.10,
              data_path: str = "data/train.jsonl") -> Recommendation:
    spec = load_spec(model)
    budget_b = parse_budget(budget)
    limit = int(budget_b * (1 - headroom))
    # the recipe it writes trains with bf16 on or off; each candidate is billed in the regime train then runs it in
    bf16 = precision != "fp32"
    base = Setup(seq_len=seq_len, device=device, devices=devices, zero=zero)
    ranks_lora = (64, 32, 16) if multi_task else (16, 8)
    ranks_qlora = (16, 8) if multi_task else (8,)
    tree: list[tuple[str, MethodConfig]] = []
    if not multi_task:
        tree.append(("full fine-tuning", MethodConfig(name=FULL)))
    tree += [(f"lora r={r}", MethodConfig(name=LORA, r=r, alpha=2 * r)) for r in ranks_lora]
    tree += [(f"qlora r={r}", MethodConfig(name=QLORA, r=r, alpha=2 * r)) for r in ranks_qlora]
    extras = [("galore rank 128", MethodConfig(name=GALORE, galore_rank=128))]
    if multi_task:
        extras.insert(0, ("full fine-tuning", MethodConfig(name=FULL)))
    rec = Recommendation(spec.name, budget_b, headroom, None)
    for label, m in tree + extras:
        fit, smallest = _best_setup(spec, m, replace(base, precision=train_regime(bf16, m.name)), limit)
        in_tree = (label, m) in tree
        if fit is not None and rec.chosen is None and in_tree:
            opt = Option(label, m, fit, True, f"fits: {fmt_bytes(fit.total)} <= {fmt_bytes(limit)} with {_describe(fit)}")
            rec.chosen = opt
        elif fit is not None:
            why = (f"fits ({fmt_bytes(fit.total)} with {_describe(fit)}), but the tree prefers {rec.chosen.label}"
                   if rec.chosen else f"fits ({fmt_bytes(fit.total)})")
            if m.name == FULL and multi_task:
                why = (f"fits ({fmt_bytes(fit.total)}), but for several tasks one adapter per task keeps them apart "
                       "and mergeable; the guide's tree picks LoRA")
            opt = Option(label, m, fit, True, why)
        else:
            opt = Option(label, m, smallest, False,
                         f"{fmt_bytes(smallest.total)} > {fmt_bytes(limit)} even at its smallest "
                         f"({_describe(smallest)})")
        rec.options.append(opt)
    if rec.chosen is not None:
        rec.recipe = _recipe(spec_ref=str(model), option=rec.chosen, seq_len=seq_len, data_path=data_path,
                             precision=precision)
    return rec


def _recipe(spec_ref: str, option: Option, seq_len: int, data_path: str, precision: str) -> dict:
    m = option.method
    entry = get_method(m.name)
    s = option.bill.setup
    method: dict = {"name": m.name}
    if entry.rank_option is not None:
        method[entry.rank_option] = getattr(m, entry.rank_option)
    if entry.takes_alpha:
        method.update({"alpha": m.alpha, "dropout": m.dropout, "target_modules": m.target_modules})
    recipe = {
        "model": recipe_model_ref(spec_ref),
        "data": {"train": data_path, "max_length": seq_len},
        "method": method,
        "train": {
            "batch_size": s["batch"],
            "grad_accum": s["grad_accum"],
            "lr": entry.lr,
            "gradient_checkpointing": s["checkpointing"],
            "bf16": precision != "fp32",
        },
        "output_dir": f"runs/{m.name}",
    }
    load_config(recipe)  # what we print must be what `tunesmith train` accepts
    return recipe
