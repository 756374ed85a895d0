"""Before step 1: will the run fit the device's memory? The plan's bill for the run's longest micro batch
against the memory there is, with the recommender's cheapest setup that fits as the remedy."""
from __future__ import annotations

from pathlib import Path

from ..config import RunConfig
from ..device import use_bf16
from ..planning import auto_device, compute_bill
from ..planning.recommend import recommend
from ..planning.setup import FULL_LOSS, SELECTIVE_LOSS, Setup, train_regime
from ..sizes import fmt_bytes
from .findings import Finding


def available_memory(device: str) -> int | None:
    """Bytes a new allocation can get now: the free memory of GPU 0, or the kernel's MemAvailable on a CPU."""
    if device == "cuda":
        import torch  # only on a GPU machine, where torch is loaded by now anyway

        return int(torch.cuda.mem_get_info(0)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def run_setup(config: RunConfig, lengths: list[int], device: str) -> Setup:
    """The setup the run's longest micro batch trains in (the lengths of its examples, longest first)."""
    t = config.train
    longest = sorted(lengths, reverse=True)[: t.batch_size]
    padding_free = t.padding_free
    return Setup(
        seq_len=sum(longest) if padding_free else max(longest), batch=1 if padding_free else len(longest),
        grad_accum=t.grad_accum, precision=train_regime(use_bf16(t.bf16), config.method.name),
        checkpointing=t.gradient_checkpointing, loss=SELECTIVE_LOSS if t.selective_loss else FULL_LOSS,
        layout="padding_free" if padding_free else "padded", device=device, fused_lora=t.fused_lora,
    )


def memory_preflight(config: RunConfig, lengths: list[int], available: int | None = None) -> Finding | None:
    """A finding when the bill of the longest micro batch exceeds the memory available now; None when it fits
    (or nothing is known about the device)."""
    if not lengths:
        return None
    device = auto_device()
    free = available_memory(device) if available is None else available
    if free is None:
        return None
    setup = run_setup(config, lengths, device)
    bill = compute_bill(config.model, config.method, setup, budget=free)
    if bill.fits:
        return None
    rec = recommend(config.model, free, seq_len=max(lengths), precision=setup.precision, device=device)
    budget = fmt_bytes(free).replace(" ", "")
    fix = (f"the guide's first setup that fits {fmt_bytes(free)} is {rec.chosen.label} with "
           f"{rec.chosen.reason.split(' with ', 1)[-1]} (tunesmith plan --model {config.model} --budget {budget} "
           f"--seq-len {max(lengths)} writes its recipe)"
           if rec.chosen else "no method of the guide's tree fits: shorten data.max_length, or use a smaller model or a "
           "machine with more memory")
    return Finding(
        code="memory_will_not_fit",
        message=f"the plan bills this run's longest micro batch at {fmt_bytes(bill.total)} ({bill.peak_phase} is the "
                f"peak), more than the {fmt_bytes(free)} of {device} memory available now",
        cause="the bill is tunesmith plan's for this recipe; expect an out-of-memory stop or heavy swapping",
        remedy=fix + "; or set train.gradient_checkpointing: true, or lower train.batch_size and raise train.grad_accum",
    )
