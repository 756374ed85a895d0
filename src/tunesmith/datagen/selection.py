"""Quality over quantity (LIMA): score every row with the base model and keep the best K, diverse.

Instruction-Following Difficulty (Li et al. 2023, "From Quantity to Quality"): IFD = PPL(answer | instruction) /
PPL(answer), both over the same answer tokens. Near 1 or above, the instruction does not help the model predict
the answer (the pair is noise or trivially predictable); below 1 and high, the instruction matters but the model
still finds the answer hard, which is what teaches most. Rows with IFD >= max_ifd are dropped, the rest are
ranked by IFD, and a row is skipped when its instruction has ROUGE-L F above `diversity` with one already kept.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.templates import render
from ..errors import TunesmithError
from ..models import load_model, load_tokenizer
from .report import StepReport
from .rouge import RougePool
from .rows import check_output_path, passed_step, read_rows, write_rows
from .step import ROW_COLUMNS, StepInfo
from .teacher import DEFAULT_LOCAL_TEACHER

INFO = StepInfo("select", inputs=("instruction", "output"), outputs=ROW_COLUMNS, model=True)


@dataclass
class SelectOptions:
    n: int = 1000
    max_ifd: float = 1.0
    diversity: float = 0.7  # ROUGE-L F between instructions above which a row is too close to a kept one
    max_answer_tokens: int = 512

    def check(self) -> None:
        if self.n < 1:
            raise TunesmithError(f"--n must be at least 1, got {self.n}")
        if not 0 < self.diversity <= 1:
            raise TunesmithError(f"--diversity must be in (0, 1], got {self.diversity}")


@torch.inference_mode()
def answer_loss(model, prefix: list[int], answer: list[int]) -> float:
    """Mean negative log-likelihood of the answer tokens given the prefix tokens."""
    ids = torch.tensor([prefix + answer])
    logits = model(input_ids=ids).logits[0, len(prefix) - 1: -1].float()
    return torch.nn.functional.cross_entropy(logits, torch.tensor(answer)).item()


def ifd_score(model, tokenizer, row: dict, max_answer_tokens: int) -> tuple[float, int]:
    """(IFD, answer tokens). The unconditioned answer starts after the begin-of-text token (end-of-text when the
    tokenizer has none), so both losses cover exactly the same answer tokens."""
    prompt = f"{row['instruction']}\n\n{row['input']}" if row["input"].strip() else row["instruction"]
    prefix = tokenizer(render(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True),
                       add_special_tokens=False)["input_ids"]
    answer = tokenizer(row["output"].strip(), add_special_tokens=False)["input_ids"][:max_answer_tokens]
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    conditioned = answer_loss(model, prefix, answer)
    alone = answer_loss(model, [start], answer)
    return math.exp(conditioned - alone), len(answer)


def select_rows(rows: list[dict], model, tokenizer, options: SelectOptions, report: StepReport) -> list[dict]:
    scored = []
    for row in rows:
        if not tokenizer(row["output"].strip(), add_special_tokens=False)["input_ids"]:
            report.drop("empty answer")
            continue
        ifd, length = ifd_score(model, tokenizer, row, options.max_answer_tokens)
        if ifd >= options.max_ifd:
            report.drop(f"IFD >= {options.max_ifd} (the instruction does not help)")
            continue
        scored.append((ifd, length, row))
    scored.sort(key=lambda s: -s[0])
    pool = RougePool(threshold=options.diversity)
    kept = []
    for ifd, length, row in scored:
        if len(kept) == options.n:
            report.drop("below the best n")
        elif pool.add_if_novel(row["instruction"]):
            kept.append({**row, "scores": {"ifd": round(ifd, 6), "answer_tokens": length}})
        else:
            report.drop(f"instruction within ROUGE-L {options.diversity} of a kept one")
    return kept


def select(path: str | Path, out: str | Path, options: SelectOptions | None = None,
           model: str = DEFAULT_LOCAL_TEACHER, loaded=None) -> StepReport:
    """`loaded` = (model, tokenizer) already in memory; otherwise `model` is loaded."""
    options = options or SelectOptions()
    options.check()
    rows = read_rows(path, need_output=INFO.needs_output)
    out = check_output_path(out, [path])
    base, tokenizer = loaded if loaded is not None else (load_model(model), load_tokenizer(model))
    base.eval()
    report = StepReport(INFO.name, str(out), rows_in=len(rows))
    kept = select_rows(rows, base, tokenizer, options, report)
    write_rows(out, [passed_step(r, INFO.name, "ifd") for r in kept])
    report.rows_out = len(kept)
    return report.finish()
