"""Measured, not guessed: build the real model, run a few real optimizer steps, compare with the bill.

How memory is measured:

- CPU: the peak resident set size (RSS) of this process during the steps, minus the RSS of the
  idle process (libraries imported, nothing loaded). The peak is the kernel's own high-water mark
  `VmHWM` from /proc/self/status, reset right before the first step by writing 5 to
  /proc/self/clear_refs, so nothing the sampling could miss and no load-time transient counts. Where
  that file is not writable, a background thread samples VmRSS every 2 ms instead (method
  "sampled"). By default glibc malloc is first told to hand every allocation above 64 KiB back to
  the system when it is freed (`mallopt(M_MMAP_THRESHOLD, 65536)`), so RSS follows the live tensors,
  the CPU counterpart of `torch.cuda.max_memory_allocated`. Without that (`live_memory=False`), the
  freed memory malloc keeps for reuse adds to RSS and grows from step to step; the bench reports
  both.
- Parameters that still point into the memory-mapped checkpoint are copied into ordinary memory
  before the steps (see `own_memory`): only memory the run holds is counted, not page cache.
- GPU: `torch.cuda.max_memory_allocated()` minus what was allocated before the model was loaded.

The steps run through the same Trainer, arguments, collator and method preparation as
`tunesmith train` (tunesmith.models.load_model + tunesmith.methods.prepare_model + MethodTrainer),
on synthetic token ids of exactly `seq_len` (every position carries loss) or on given examples.
"""
from __future__ import annotations

import ctypes
import importlib
import re
import shutil
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

from ..config import RunConfig
from ..data.assemble import prepare_data
from ..data.masking import IGNORE_INDEX, TokenizedExample
from ..data.preference import PreferenceExample
from ..methods import get_method, load_kwargs, prepare_model
from ..models import load_model, load_tokenizer
from ..objectives import DEFAULT_OBJECTIVE, get_objective
from ..sizes import MiB, fmt_bytes
from .bill import Bill, compute_bill
from .setup import FULL_LOSS, SELECTIVE_LOSS, Setup, train_regime
from .spec import load_spec

M_MMAP_THRESHOLD = -3
LIVE_THRESHOLD = 64 * 1024


def _status(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    m = re.search(rf"^{key}:\s+(\d+)\s+kB", text, re.M)
    return int(m.group(1)) * 1024 if m else 0


def rss() -> int:
    if Path("/proc/self/status").exists():
        return _status("VmRSS")
    import psutil

    return psutil.Process().memory_info().rss


class PeakRSS:
    """Peak RSS from now on: the kernel's VmHWM after a reset, or a 2 ms sampling thread."""

    def __init__(self):
        self.method = "VmHWM"
        self._peak = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.method = "sampled"
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, rss())
            time.sleep(0.002)

    def peak(self) -> int:
        if self.method == "VmHWM":
            return _status("VmHWM")
        self._stop.set()
        if self._thread:
            self._thread.join()
        return max(self._peak, rss())


def own_memory(model) -> None:
    """Copy floating-point parameters and buffers into ordinary memory.

    transformers maps the safetensors checkpoint into memory; tensors that still point into it are
    file-backed pages, clean page cache the kernel can drop at any time. Loading a 4-bit model reads
    every page of the fp32 checkpoint while quantizing, which leaves the whole file resident in RSS
    without being memory the run needs. After the copy, RSS counts what training really holds.
    """
    import torch

    with torch.no_grad():
        for module in model.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                if p.is_floating_point() and p.device.type == "cpu":
                    p.data = p.data.clone()
            for name, b in list(module.named_buffers(recurse=False)):
                if b is not None and b.is_floating_point() and b.device.type == "cpu":
                    module._buffers[name] = b.clone()


def keep_rss_live() -> bool:
    """Make glibc return freed blocks above 64 KiB to the system (RSS then follows the live tensors)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, LIVE_THRESHOLD))
    except (OSError, AttributeError):
        return False


@dataclass
class Measurement:
    model: str
    method: str
    device: str
    seq_len: int
    batch: int
    grad_accum: int
    steps: int
    precision: str
    predicted: int
    measured: int
    how: str
    seconds_per_step: float
    tokens_per_second: float
    bill: Bill
    padded: bool = False
    notes: list[str] = field(default_factory=list)
    objective: str = DEFAULT_OBJECTIVE  # train.objective; a preference pair is two sequences of seq_len

    @property
    def error(self) -> float:
        return (self.predicted - self.measured) / self.measured if self.measured else float("nan")

    def as_dict(self) -> dict:
        return {
            "model": self.model,
            "method": self.method,
            "device": self.device,
            "seq_len": self.seq_len,
            "batch": self.batch,
            "grad_accum": self.grad_accum,
            "steps": self.steps,
            "precision": self.precision,
            "padded": self.padded,
            "objective": self.objective,
            "predicted_bytes": self.predicted,
            "measured_bytes": self.measured,
            "predicted_mib": round(self.predicted / MiB, 1),
            "measured_mib": round(self.measured / MiB, 1),
            "error": round(self.error, 4),
            "how": self.how,
            "seconds_per_step": round(self.seconds_per_step, 3),
            "tokens_per_second": round(self.tokens_per_second, 1),
            "peak_phase": self.bill.peak_phase,
            "notes": self.notes,
        }

    def summary_line(self) -> str:
        return (f"predicted {fmt_bytes(self.predicted)}, measured {fmt_bytes(self.measured)} ({self.how}), "
                f"error {self.error:+.1%}; {self.seconds_per_step:.2f} s/step, {self.tokens_per_second:.0f} tokens/s")


def _preimport(config: RunConfig) -> None:
    """Import everything a step needs before the idle RSS is read, so library code is not billed."""
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import Trainer, TrainingArguments  # noqa: F401

    from ..training.trainer import MethodTrainer  # noqa: F401

    for module in get_method(config.method.name).warm_imports:  # peft, bitsandbytes, galore_torch
        importlib.import_module(module)
    try:
        mt = load_spec(config.model).model_type
        importlib.import_module(f"transformers.models.{mt}.modeling_{mt}")
    except Exception:  # noqa: BLE001 - only a warm-up
        pass


def precision_of(config: RunConfig) -> str:
    from ..device import use_bf16

    return train_regime(use_bf16(config.train.bf16), config.method.name)


def _run_config(config: RunConfig, batch: int, grad_accum: int, steps: int, out: str) -> RunConfig:
    cfg = config.model_copy(deep=True)
    t = cfg.train
    t.batch_size = batch
    t.grad_accum = grad_accum
    t.max_steps = steps
    t.logging_steps = 10**6
    t.save_steps = 10**6
    t.eval_each_epoch = False
    t.warmup = 0.0
    cfg.output_dir = out
    return cfg


def synthetic_examples(vocab: int, n: int, seq_len: int, preference: bool, seed: int) -> list:
    """n examples of random token ids, every position supervised: sequences of exactly seq_len, or (preference
    objectives) pairs of two such sequences, chosen and rejected."""
    import torch

    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(0, vocab, (seq_len,), generator=g).tolist() for _ in range(n * (2 if preference else 1))]
    if not preference:
        return [SimpleNamespace(input_ids=r, labels=r) for r in rows]
    seq = [TokenizedExample(r, r, ["synthetic"] * len(r)) for r in rows]
    return [PreferenceExample(seq[2 * i], seq[2 * i + 1]) for i in range(n)]


def sequences_of(examples: list) -> list:
    """The sequences a micro batch's rows hold: each pair's chosen and rejected, or each example."""
    out = []
    for ex in examples:
        out.extend((ex.chosen, ex.rejected) if isinstance(ex, PreferenceExample) else (ex,))
    return out


def measure(
    config: RunConfig,
    *,
    seq_len: int = 256,
    batch: int = 1,
    grad_accum: int = 1,
    steps: int = 2,
    examples: Optional[list[dict]] = None,
    live_memory: bool = True,
    setup: Optional[Setup] = None,
    tokenizer=None,
) -> Measurement:
    """Run `steps` optimizer steps of `config` and compare the peak memory with the bill.

    `examples` ({"input_ids", "labels"} dicts, or PreferenceExample pairs for a preference objective) replace
    the synthetic data; then seq_len is the longest sequence (padded rows) or the mean one (padding-free rows;
    a pair is two sequences). Gradient accumulation above 2 is measured at 2: from the second micro batch
    on, memory repeats (the gradients of earlier micro batches are what accumulation adds).
    """
    import torch
    from transformers import TrainerCallback
    from transformers.trainer_utils import SaveStrategy

    from ..regularize import build_loss_terms
    from ..training.run import build_trainer, use_fast_path

    cuda = torch.cuda.is_available()
    notes: list[str] = []
    accum = min(grad_accum, 2)
    if grad_accum > 2:
        notes.append(f"grad_accum {grad_accum} measured as 2 (memory repeats from the second micro batch on)")
    _preimport(config)
    r = config.regularize
    # EWC's Fisher reads reference text through the tokenizer; loaded before the idle RSS so it is not billed
    if tokenizer is None and r.ewc is not None:
        tokenizer = load_tokenizer(config.model, config.trust_remote_code)
    live = False
    if not cuda and live_memory:
        live = keep_rss_live()
    idle_rss = rss()
    idle_cuda = torch.cuda.memory_allocated() if cuda else 0

    out = tempfile.mkdtemp(prefix="tunesmith-measure-")
    try:
        cfg = _run_config(config, batch, accum, steps, out)
        model = load_model(cfg.model, trust_remote_code=cfg.trust_remote_code, **load_kwargs(cfg))
        model.config.use_cache = False
        prepared = prepare_model(model, cfg, total_steps=steps)
        use_fast_path(prepared, cfg)
        own_memory(prepared.model)
        vocab = model.get_input_embeddings().num_embeddings
        n = steps * batch * accum
        preference = get_objective(cfg.train.objective).preference
        if examples is None:
            data = synthetic_examples(vocab, n, seq_len, preference, cfg.train.seed)
            padded = False
        else:
            data = [d if isinstance(d, PreferenceExample) else SimpleNamespace(**d) for d in examples][:n]
            while len(data) < n:
                data += data[: n - len(data)]
            lengths = [len(x.input_ids) for x in sequences_of(data)]
            # padded rows are as long as the longest; padding-free rows hold the sequences back to back
            seq_len = max(lengths) if not config.train.padding_free else -(-sum(lengths) // len(lengths))
            sequences_per_micro_batch = len(lengths) // (steps * accum)
            padded = sequences_per_micro_batch > 1 and len(set(lengths)) > 1

        times: list[float] = []

        class Timer(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                self.t = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                times.append(time.perf_counter() - self.t)

        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        tracker = None if cuda else PeakRSS()
        # as tunesmith.train builds it, regularizers included (EWC's Fisher pass is measured too)
        loss_terms, _ = build_loss_terms(cfg, prepared.model, tokenizer, None, Path(out))
        trainer = build_trainer(cfg, prepared, Path(out), data, callbacks=[Timer()], loss_terms=loss_terms)
        # a measurement keeps nothing: the Trainer's end-of-run checkpoint would write weights and optimizer
        # state (0.7 GB for full fine-tuning of the built-in model) only to delete them
        trainer.args.save_strategy = SaveStrategy.NO
        trainer.train()
        if cuda:
            torch.cuda.synchronize()
            measured = torch.cuda.max_memory_allocated() - idle_cuda
            how = "torch.cuda.max_memory_allocated"
        else:
            measured = tracker.peak() - idle_rss
            how = f"peak RSS over idle ({tracker.method}, {'live malloc' if live else 'default malloc'})"
    finally:
        shutil.rmtree(out, ignore_errors=True)

    s = setup or Setup()
    s.seq_len, s.batch, s.grad_accum = seq_len, batch, accum
    s.precision = precision_of(config)
    s.checkpointing = config.train.gradient_checkpointing
    s.device = "cuda" if cuda else "cpu"
    s.padded = padded
    s.layout = "padding_free" if config.train.padding_free else "padded"
    s.fused_lora = config.train.fused_lora
    s.loss = SELECTIVE_LOSS if trainer.selective_loss or preference else FULL_LOSS
    s.objective = cfg.train.objective
    s.distill, s.ewc = r.distill is not None, r.ewc is not None
    if r.ewc is not None:
        s.ewc_tokens = r.ewc.chunk_tokens if r.ewc.reference == "general" else config.data.max_length
    if examples is not None:
        seqs = sequences_of(data)
        sup = sum(sum(1 for l in x.labels[1:] if l != IGNORE_INDEX) for x in seqs) / len(seqs)
        s.supervised_share = min(1.0, max(sup, 1.0) / max(1, seq_len - 1))
    bill = compute_bill(config.model, config.method, s)
    steady = times[1:] or times
    sec = statistics.median(steady) if steady else float("nan")
    return Measurement(
        model=config.model,
        method=config.method.name,
        device=s.device,
        seq_len=seq_len,
        batch=batch,
        grad_accum=accum,
        steps=steps,
        precision=s.precision,
        predicted=bill.peak,
        measured=measured,
        how=how,
        seconds_per_step=sec,
        tokens_per_second=(s.tokens * accum / sec) if sec == sec and sec > 0 else 0.0,
        bill=bill,
        padded=padded,
        notes=notes,
        objective=s.objective,
    )


def dry_run(config: RunConfig, *, steps: int = 2, live_memory: bool = True) -> dict:
    """`tunesmith train RECIPE --dry-run`: data stats, the bill for the longest batch, measured peak
    memory and time per step over `steps` real steps on the longest examples; writes no run."""
    tokenizer = load_tokenizer(config.model, config.trust_remote_code)
    data = prepare_data(config, tokenizer)  # what train would train on: task prefixes, mixing and replay included
    stats = data.stats()
    t = config.train
    accum = min(t.grad_accum, 2)
    need = steps * t.batch_size * accum
    longest = sorted(data.train, key=lambda ex: len(ex.input_ids), reverse=True)[:need]  # a pair: both replies
    examples = [ex if isinstance(ex, PreferenceExample) else {"input_ids": ex.input_ids, "labels": ex.labels}
                for ex in longest]
    result = measure(config, batch=t.batch_size, grad_accum=t.grad_accum, steps=steps, examples=examples,
                     tokenizer=tokenizer, live_memory=live_memory)
    return {"data": stats, "measurement": result}
