"""`tunesmith plan`: the memory bill of a training setup, a recommender that fits a budget, and a
measurement that checks the bill against a real run.

    import tunesmith
    bill = tunesmith.plan("llama-3.1-8b", method="lora", rank=16, seq_len=2048, budget="24GiB")
    print(bill.total / 2**30, bill.fits)

Nothing here loads weights or imports torch, except `measure`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from ..config import MethodConfig, load_config
from ..errors import TunesmithError
from ..methods import DEFAULT_METHOD, METHODS, get_method
from ..objectives import DEFAULT_OBJECTIVE
from ..sizes import GiB, MiB, fmt_bytes, parse_size
from .bill import Bill, compute_bill
from .setup import PRECISIONS, SELECTIVE_LOSS, Setup, train_regime
from .spec import ModelSpec, load_spec
from .trainable import trainable_count

__all__ = ["plan", "compute_bill", "Setup", "Bill", "load_spec", "ModelSpec", "trainable_count", "parse_size",
           "fmt_bytes", "auto_device", "auto_precision", "method_config", "GiB", "MiB"]


def auto_device() -> str:
    """cuda when an NVIDIA driver is present, else cpu (without importing torch)."""
    return "cuda" if Path("/proc/driver/nvidia/version").exists() else "cpu"


def auto_precision(device: str, method: str = DEFAULT_METHOD) -> str:
    """The regime `tunesmith train` runs `method` in with `train.bf16: auto` on that device."""
    if device == "cuda":
        return train_regime(True, method)
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    return train_regime(" amx_tile" in flags, method)


def method_config(method: str = DEFAULT_METHOD, rank: Optional[int] = None, targets: Optional[list[str]] = None,
                  **options) -> MethodConfig:
    """A validated MethodConfig; `rank` sets the option the method's registry entry names (r for the LoRA
    family and VeRA, init_r for AdaLoRA, galore_rank for GaLore), and alpha = 2 x rank where it takes one."""
    fields: dict = {"name": method, **{k: v for k, v in options.items() if v is not None}}
    entry = METHODS.get(method)  # an unknown name is left to the config's error, which lists the methods
    if rank is not None and entry is not None:
        if entry.rank_option is None:
            raise TunesmithError(f"--rank does not apply to method {method}: {entry.no_rank}")
        fields[entry.rank_option] = rank
        for key, value in (entry.rank_extra(rank, MethodConfig()) if entry.rank_extra else {}).items():
            fields.setdefault(key, value)
        if entry.takes_alpha and "alpha" not in options:
            fields["alpha"] = 2 * rank
    if targets:
        fields["target_modules"] = list(targets)
    # validated as a recipe's `method` section, so errors name method.<key>, the value and the fix
    return load_config({"data": {"train": "(plan)"}, "method": fields}).method


def plan(
    model: Union[str, dict, ModelSpec] = "smollm2-135m-instruct",
    method: Union[str, MethodConfig] = DEFAULT_METHOD,
    *,
    rank: Optional[int] = None,
    targets: Optional[list[str]] = None,
    seq_len: int = 2048,
    batch: int = 1,
    grad_accum: int = 1,
    precision: str = "auto",
    checkpointing: bool = False,
    optimizer: str = "adamw",
    devices: int = 1,
    zero: int = 0,
    device: str = "auto",
    loss: str = SELECTIVE_LOSS,
    layout: str = "padding_free",
    objective: str = DEFAULT_OBJECTIVE,
    distill: bool = False,
    ewc: bool = False,
    budget=None,
    **method_options,
) -> Bill:
    """The memory bill of one training setup (see tunesmith.planning.lines for every line's formula). With a
    preference objective (dpo, orpo, simpo) `batch` counts pairs and `seq_len` is one reply's sequence: each pair
    is chosen + rejected in one row, and dpo adds its reference pass. `distill` and `ewc` price those regularizers
    (regularize.distill: the teacher pass and KD loss; regularize.ewc: the Fisher pass and what it keeps)."""
    dev = auto_device() if device == "auto" else device
    m = method if isinstance(method, MethodConfig) else method_config(method, rank, targets, **method_options)
    prec = auto_precision(dev, m.name) if precision == "auto" else precision
    if prec not in PRECISIONS:
        raise TunesmithError(f"precision '{precision}': use auto, {', '.join(PRECISIONS)}")
    setup = Setup(seq_len=seq_len, batch=batch, grad_accum=grad_accum, precision=prec, checkpointing=checkpointing,
                  optimizer=get_method(m.name).optimizer or optimizer, devices=devices, zero=zero, loss=loss,
                  layout=layout, device=dev, objective=objective, distill=distill, ewc=ewc)
    return compute_bill(model, m, setup, budget=budget)
