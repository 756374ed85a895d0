"""SIGINT (Ctrl-C) and SIGTERM during training: finish the step, save a checkpoint there, stop.

The run can then be continued with `--resume` as if it had never stopped. A second signal is not caught:
it stops the process at once (the checkpoint being written then is never picked, see AtomicCheckpoints).
"""
from __future__ import annotations

import signal
import threading
from pathlib import Path

from transformers import TrainerCallback

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(BaseException):
    """Training stopped on a signal after saving a checkpoint. A BaseException, like KeyboardInterrupt, so that
    no `except Exception` reports it as a failure. `exit_code` is the shell's 128 + signal number: 130 for
    SIGINT, 143 for SIGTERM."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None):
        self.signal_name = signal.Signals(signum).name
        self.exit_code = 128 + signum
        self.step = step
        self.checkpoint = checkpoint
        super().__init__(f"stopped by {self.signal_name} at step {step}; checkpoint saved in {checkpoint}")


class StopOnSignal(TrainerCallback):
    """While entered, SIGINT and SIGTERM ask the Trainer to save and stop at the end of the current step."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _handle(self, signum, frame) -> None:
        self.received = signum
        self._restore()

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def on_step_end(self, args, state, control, **kwargs):
        if self.received is not None:
            control.should_save = True
            control.should_training_stop = True
