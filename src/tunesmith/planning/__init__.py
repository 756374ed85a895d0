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

from ..config import MethodConfig
from ..errors import TunesmithError
from .bill import GiB, MiB, PRECISIONS, Bill, Setup, compute_bill, fmt_bytes, parse_size, trainable_count
from .spec import ModelSpec, load_spec

__all__ = ["plan", "compute_bill", "Setup", "Bill", "load_spec", "ModelSpec", "trainable_count", "parse_size",
           "fmt_bytes", "auto_device", "auto_precision", "method_config", "GiB", "MiB"]


def auto_device() -> str:
    """cuda when an NVIDIA driver is present, else cpu (without importing torch)."""
    return "cuda" if Path("/proc/driver/nvidia/version").exists() else "cpu"


def auto_precision(device: str) -> str:
    """The regime `tunesmith train` runs with `train.bf16: auto` on that device."""
    if device == "cuda":
        return "amp"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "fp32"
    return "amp" if " amx_tile" in flags else "fp32"


def method_config(method: str = "lora", rank: Optional[int] = None, targets: Optional[list[str]] = None,
                  **options) -> MethodConfig:
    """A validated MethodConfig; `rank` is r (LoRA family, VeRA), init_r (AdaLoRA) or galore_rank."""
    fields: dict = {"name": method, **{k: v for k, v in options.items() if v is not None}}
    if rank is not None:
        key = {"adalora": "init_r", "galore": "galore_rank"}.get(method, "r")
        if method in ("full", "freeze"):
            raise TunesmithError(f"--rank does not apply to method {method}: it trains the weights themselves")
        fields[key] = rank
        if method == "adalora":
            fields.setdefault("target_r", min(rank, MethodConfig().target_r))
        if method in ("lora", "dora", "qlora", "loraplus", "adalora") and "alpha" not in options:
            fields["alpha"] = 2 * rank
    if targets:
        fields["target_modules"] = list(targets)
    from ..config import load_config

    # validated as a recipe's `method` section, so errors name method.<key>, the value and the fix
    return load_config({"data": {"train": "(plan)"}, "method": fields}).method


def plan(
    model: Union[str, dict, ModelSpec] = "smollm2-135m-instruct",
    method: Union[str, MethodConfig] = "lora",
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
    loss: str = "selective",
    layout: str = "padding_free",
    budget=None,
    **method_options,
) -> Bill:
    """The memory bill of one training setup (see tunesmith.planning.bill for every line's formula)."""
    dev = auto_device() if device == "auto" else device
    prec = auto_precision(dev) if precision == "auto" else precision
    if prec not in PRECISIONS:
        raise TunesmithError(f"precision '{precision}': use auto, {', '.join(PRECISIONS)}")
    m = method if isinstance(method, MethodConfig) else method_config(method, rank, targets, **method_options)
    setup = Setup(seq_len=seq_len, batch=batch, grad_accum=grad_accum, precision=prec, checkpointing=checkpointing,
                  optimizer="galore" if m.name == "galore" else optimizer, devices=devices, zero=zero, loss=loss,
                  layout=layout, device=dev)
    return compute_bill(model, m, setup, budget=budget)
