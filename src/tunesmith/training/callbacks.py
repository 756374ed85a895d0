"""Trainer callbacks: a progress bar with loss, learning rate and tokens/s; metrics.jsonl as it happens."""
from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback


class ProgressCallback(TrainerCallback):
    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.bar = None
        self.start = None
        self.tokens_at_start = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()
        self.tokens_at_start = state.num_input_tokens_seen
        if self.enabled:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", unit="step", dynamic_ncols=True)

    def tokens_per_second(self, state) -> float:
        elapsed = time.perf_counter() - (self.start or time.perf_counter())
        return (state.num_input_tokens_seen - self.tokens_at_start) / elapsed if elapsed > 0 else 0.0

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs and "loss" in logs:
            self.bar.set_postfix(
                loss=f"{logs['loss']:.4f}", lr=f"{logs.get('learning_rate', 0):.2e}", tok_s=f"{self.tokens_per_second(state):.0f}"
            )

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class MetricsFileCallback(TrainerCallback):
    """Appends every log (train and eval) to metrics.jsonl, flushed, so a crash loses nothing logged.

    A resumed run starts again at its checkpoint's step, so the rows an interrupted run logged after that
    step are dropped when training begins: every step is in the file once, with the values of the run
    that produced the final weights.
    """

    def __init__(self, path: Path, progress: ProgressCallback):
        self.path = path
        self.progress = progress

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step > 0:
            drop_rows_after(self.path, state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs:
            return
        if "loss" in logs:
            # Added to the logs themselves, so the trackers of train.report_to (called after us) record them too.
            logs["tokens_per_second"] = round(self.progress.tokens_per_second(state), 1)
            logs["tokens_seen"] = int(state.num_input_tokens_seen)
            logs["peak_memory_mib"] = peak_memory_mib()
        record = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), **logs}
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")


def peak_memory_mib() -> float:
    """The peak so far: GPU memory allocated by torch on CUDA, else this process's peak resident set size."""
    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux reports KiB


def drop_rows_after(path: Path, step: int) -> None:
    """Keep the rows of metrics.jsonl up to `step`, rewritten atomically (a temporary file, then a rename).

    A line that does not parse is the torn last write of a killed run, and goes too.
    """
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row["step"] <= step:
            kept.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    tmp.replace(path)
