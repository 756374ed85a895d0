"""The doctor during training: a TrainerCallback that runs the detectors on every log, prints what it finds,
keeps doctor.json current and, on a fatal finding (NaN/Inf loss), stops training without saving the bad
weights, leaving the last good checkpoint as the one --resume continues from."""
from __future__ import annotations

import sys
from pathlib import Path

from tqdm.auto import tqdm
from transformers import TrainerCallback

from ..data.masking import TokenizedExample
from ..data.report import ends_with_supervised_end_of_turn
from ..errors import TunesmithError
from ..modeling import decoder_body
from ..rundir import checkpoints
from .answers import end_of_turn_unsupervised
from .detectors import RunFacts, training_findings
from .findings import Finding, merge_findings, read_findings, write_findings

SUSPECT_PREFIX = ".suspect-"
CURVE_CODES = {"loss_not_falling", "grad_norm_explosion", "overfitting"}


class DoctorStopped(TunesmithError):
    """Training stopped on a fatal finding; the run folder keeps its good checkpoints and doctor.json."""


class BatchRecorder:
    """Which examples the training forward passes saw: a pre-hook on the decoder body splits each batch into
    examples (padding-free rows at position 0, padded rows by their attention mask) and looks their tokens up."""

    def __init__(self, examples):
        examples = [ex for ex in examples if isinstance(ex, TokenizedExample)]  # SFT rows (not preference pairs)
        self.ids = {tuple(ex.input_ids): ex.where for ex in examples}
        self.supervised = {ex.where: ex.num_supervised for ex in examples}
        self.window: list[str] = []  # examples since the last log
        self.steps = 0
        self.supervised_total = 0
        self.handle = None

    def attach(self, model) -> None:
        self.handle = decoder_body(model).register_forward_pre_hook(self._record, with_kwargs=True)

    def detach(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def _record(self, module, args, kwargs) -> None:
        if not module.training:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            return
        for row in _split_examples(ids, kwargs.get("position_ids"), kwargs.get("attention_mask")):
            where = self.ids.get(tuple(row))
            if where is not None:
                self.window.append(where)
                self.supervised_total += self.supervised[where]

    def supervised_per_step(self) -> float | None:
        return self.supervised_total / self.steps if self.steps else None


def _split_examples(ids, position_ids, attention_mask) -> list[list[int]]:
    rows = []
    for r in range(ids.shape[0]):
        row = ids[r]
        if attention_mask is not None and attention_mask.dim() == 2:
            row = row[attention_mask[r].bool()]
            rows.append(row.tolist())
        elif position_ids is not None:
            starts = (position_ids[r] == 0).nonzero().flatten().tolist() + [row.shape[0]]
            rows.extend(row[a:b].tolist() for a, b in zip(starts, starts[1:]) if b > a)
        else:
            rows.append(row.tolist())
    return rows


class DoctorCallback(TrainerCallback):
    def __init__(self, out: Path, facts: RunFacts, examples, echo: bool = True, preflight: list[Finding] | None = None):
        self.out = Path(out)
        self.preflight = preflight or []  # findings made before the model loaded (memory), reported at step 0
        self.facts = facts
        self.examples = examples
        self.echo = echo
        self.recorder = BatchRecorder(examples)
        self.rows: list[dict] = []
        self.findings: list[Finding] = read_findings(self.out)
        self.fatal: Finding | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.recorder.attach(model)
        sft = [ex for ex in self.examples if isinstance(ex, TokenizedExample)]
        self._report([*self.preflight, end_of_turn_unsupervised(sft, ends_with_supervised_end_of_turn)])

    def on_step_end(self, args, state, control, **kwargs):
        self.recorder.steps += 1

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or self.fatal is not None:  # after a fatal finding only the Trainer's closing summary is logged
            return
        self.rows.append({"step": state.global_step, **logs})
        window, self.recorder.window = self.recorder.window, []
        found = training_findings(self.rows, self.facts, self.recorder.supervised_per_step())
        fatal = next((f for f in found if f.fatal), None)
        if fatal is not None and args.world_size == 1:  # rank 0 alone cannot stop the other ranks of a multi-process run
            fatal.example_ids = sorted(set(window))
            fatal.message += "; " + self._set_aside_suspect_checkpoints(fatal.step)
            self.fatal = fatal
            control.should_training_stop = True
            control.should_save = False  # never checkpoint the wrecked weights
            control.should_evaluate = False
        self._report(found, curves=True)

    def on_train_end(self, args, state, control, **kwargs):
        self.recorder.detach()

    def _set_aside_suspect_checkpoints(self, bad_step: int) -> str:
        """Weights saved at or after the last finite log may already be broken (the loss at step k is computed with
        the weights after step k-1): those checkpoints are renamed to hidden .suspect-checkpoint-N folders, so the
        newest checkpoint left is the last good one."""
        finite = [r["step"] for r in self.rows if "loss" in r and r["step"] < bad_step]
        last_good_log = max(finite, default=0)
        for ckpt in checkpoints(self.out):
            if int(ckpt.name.split("-")[1]) >= last_good_log:
                ckpt.rename(ckpt.with_name(SUSPECT_PREFIX + ckpt.name))
        kept = checkpoints(self.out)
        return (f"training stopped; the last good checkpoint is {kept[-1].name}" if kept
                else "training stopped before any good checkpoint was saved")

    def _report(self, found: list[Finding | None], curves: bool = False) -> None:
        """Print the findings not seen before and rewrite doctor.json. With `curves`, `found` is the whole current
        verdict of the training-curve detectors: a curve finding no longer true (a loss that did start to fall) goes."""
        fresh = [f for f in found if f is not None]
        before = {f.code for f in self.findings}
        kept = [f for f in self.findings if not curves or f.code not in CURVE_CODES or f.fatal]
        updated = merge_findings(kept, fresh)
        if [f.as_dict() for f in updated] == [f.as_dict() for f in self.findings]:
            return
        self.findings = updated
        write_findings(self.out, self.findings)
        if self.echo:
            for f in fresh:
                if f.code not in before:
                    tqdm.write("doctor: " + f.text(), file=sys.stderr)
