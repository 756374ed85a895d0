"""Rule-based cleaning of instruction data, one reason per dropped row: length bounds in tokens of the run's
tokenizer, empty or refusal answers, a language check, answers that copy the instruction, and rows that
tunesmith's own data loader would reject."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..data.formats import to_conversation
from ..data.loading import Row
from ..errors import TunesmithError
from ..models import load_tokenizer
from .report import StepReport
from .rouge import rouge_l
from .rows import check_output_path, passed_step, read_rows, write_rows
from .step import ROW_COLUMNS, StepInfo
from .teacher import DEFAULT_LOCAL_TEACHER

INFO = StepInfo("filter", inputs=("instruction", "output"), outputs=ROW_COLUMNS)
REFUSALS = re.compile(r"\b(i'?m sorry|i am sorry|i apologi[sz]e|as an ai\b|as a language model|i cannot|i can'?t "
                      r"(help|assist|provide|do)|i'?m (not able|unable) to|i am (not able|unable) to)", re.IGNORECASE)
LANGUAGES = ("en", "any")


@dataclass
class FilterOptions:
    min_tokens: int = 1  # tokens of the answer
    max_tokens: int = 2048  # tokens of instruction + input + answer
    language: str = "en"  # "en": at least 80% of the letters are ASCII; "any": no check
    copy_threshold: float = 0.9  # ROUGE-L F of answer vs instruction at or above which the answer copies it

    def check(self) -> None:
        if self.language not in LANGUAGES:
            raise TunesmithError(f"--language '{self.language}' is not supported; use one of {', '.join(LANGUAGES)}")
        if self.min_tokens < 0 or self.max_tokens < max(1, self.min_tokens):
            raise TunesmithError(f"--min-tokens {self.min_tokens} / --max-tokens {self.max_tokens}: need "
                                 "0 <= min <= max and max >= 1")


def ascii_letter_share(text: str) -> float:
    letters = [c for c in text if c.isalpha()]
    return sum(c.isascii() for c in letters) / len(letters) if letters else 1.0


def row_problem(row: dict, count_tokens, options: FilterOptions, where: str = "") -> Optional[str]:
    """Why this row is dropped, or None to keep it; the checks run cheapest first."""
    answer = row["output"].strip()
    if not answer:
        return "empty answer"
    if REFUSALS.search(answer[:300]):
        return "refusal answer"
    prompt = f"{row['instruction']}\n\n{row['input']}" if row["input"].strip() else row["instruction"]
    if options.language == "en" and ascii_letter_share(prompt + answer) < 0.8:
        return "not English (fewer than 80% ASCII letters)"
    if rouge_l(prompt, answer).fmeasure >= options.copy_threshold:
        return f"answer copies the instruction (ROUGE-L >= {options.copy_threshold})"
    answer_tokens = count_tokens(answer)
    if answer_tokens < options.min_tokens:
        return f"answer under {options.min_tokens} tokens"
    if count_tokens(prompt) + answer_tokens > options.max_tokens:
        return f"over {options.max_tokens} tokens"
    try:
        to_conversation(Row(row, where), "alpaca")
    except TunesmithError as exc:
        return f"rejected by the data loader: {str(exc).split(': ', 1)[-1]}"
    return None


def filter_rows(rows: list[dict], tokenizer, options: FilterOptions, report: StepReport) -> list[dict]:
    def count_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    kept, reasons = [], []
    for row in rows:
        problem = row_problem(row, count_tokens, options, row["id"])
        if problem:
            report.drop(problem)
            reasons.append({"id": row["id"], "reason": problem})
        else:
            kept.append(row)
    report.extra["dropped_rows"] = reasons
    return kept


def filter_file(path: str | Path, out: str | Path, options: FilterOptions | None = None, tokenizer=None,
                model: str = DEFAULT_LOCAL_TEACHER) -> StepReport:
    options = options or FilterOptions()
    options.check()
    rows = read_rows(path, need_output=INFO.needs_output)
    out = check_output_path(out, [path])
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model)
    report = StepReport(INFO.name, str(out), rows_in=len(rows))
    kept = filter_rows(rows, tokenizer, options, report)
    write_rows(out, [passed_step(r, INFO.name, "rules") for r in kept])
    report.rows_out = len(kept)
    return report.finish()
