"""Augmentation of existing rows by a teacher: a paraphrased instruction, a back-translated instruction (to a
pivot language and back), and a chain-of-thought expansion of the answer. Each new row links to its original
(provenance.source_ids) and has the stable id `<original id>-<operator>`."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import TunesmithError
from .report import StepReport
from .rows import AppendLog, check_output_path, provenance, read_rows, stable_seed
from .step import ROW_COLUMNS, StepInfo
from .teacher import DEFAULT_MAX_TOKENS, Reply, Request, Teacher, check_max_tokens
from .teachers import TeacherSpec, as_teacher

INFO = StepInfo("augment", inputs=("instruction", "output"), outputs=ROW_COLUMNS, teacher=True)
OPERATORS = ("paraphrase", "backtranslate", "cot")
PARAPHRASE = ("Paraphrase the following instruction: keep its meaning, requirements and any names or numbers, change "
              "the wording. Reply with the paraphrase only.\n\nInstruction:\n{text}")
TRANSLATE = "Translate the following text into {language}. Reply with the translation only.\n\nText:\n{text}"
COT = ("Here is a task and its correct answer. Rewrite the answer so that it first reasons step by step and then "
       "ends with the same final answer. Reply with the new answer only.\n\nTask:\n{task}\n\nAnswer:\n{answer}")


@dataclass
class AugmentOptions:
    ops: tuple[str, ...] = ("paraphrase",)
    pivot: str = "French"
    seed: int = 0
    max_tokens: int = DEFAULT_MAX_TOKENS  # per teacher reply
    temperature: float = 0.7

    def check(self) -> None:
        unknown = [op for op in self.ops if op not in OPERATORS]
        if unknown or not self.ops:
            raise TunesmithError(f"--ops '{','.join(self.ops)}': use one or more of {', '.join(OPERATORS)}")
        check_max_tokens(self.max_tokens)


def augment(path: str | Path, out: str | Path, teacher: Teacher | TeacherSpec,
            options: AugmentOptions) -> StepReport:
    options.check()
    rows = read_rows(path, need_output=INFO.needs_output)
    out = check_output_path(out, [path])
    log = AppendLog(out, INFO.name)
    teacher = as_teacher(teacher)
    report = StepReport(INFO.name, str(out), rows_in=len(rows), resumed=len(log.existing))
    for op in options.ops:
        todo = [r for r in rows if f"{r['id']}-{op}" not in log.ids]
        replies = _run_operator(op, todo, teacher, options)
        for row, reply in zip(todo, replies):
            problem = _problem(row, op, reply)
            if problem:
                report.drop(f"{op}: {problem}")
                continue
            new = {"instruction": row["instruction"], "input": row["input"], "output": row["output"]}
            new["output" if op == "cot" else "instruction"] = reply.text.strip()
            log.append({"id": f"{row['id']}-{op}", **new,
                        "provenance": provenance(INFO.name, op, teacher.name, [row["id"]])})
    report.rows_out = len(log.ids)
    return report.finish(teacher)


def _requests(template: str, values: list[dict], options: AugmentOptions, salt: str) -> list[Request]:
    return [Request([{"role": "user", "content": template.format(**v)}], options.max_tokens, options.temperature,
                    seed=stable_seed(options.seed, v.get("id", ""), salt)) for v in values]


def _run_operator(op: str, rows: list[dict], teacher: Teacher, options: AugmentOptions) -> list[Reply]:
    if not rows:
        return []
    if op == "paraphrase":
        return teacher.generate(_requests(PARAPHRASE, [{"id": r["id"], "text": r["instruction"]} for r in rows],
                                          options, op))
    if op == "cot":
        task = [{"id": r["id"], "task": _task(r), "answer": r["output"]} for r in rows]
        return teacher.generate(_requests(COT, task, options, op))
    there = teacher.generate(_requests(TRANSLATE, [{"id": r["id"], "text": r["instruction"],
                                                    "language": options.pivot} for r in rows], options, "to"))
    back = teacher.generate(_requests(TRANSLATE, [{"id": r["id"], "text": t.text, "language": "English"}
                                                  for r, t in zip(rows, there)], options, "back"))
    return [t if t.finish_reason != "stop" or not t.text.strip() else b for t, b in zip(there, back)]


def _task(row: dict) -> str:
    return f"{row['instruction']}\n\n{row['input']}" if row["input"].strip() else row["instruction"]


def _problem(row: dict, op: str, reply: Reply) -> str | None:
    if reply.finish_reason == "error":
        return f"teacher reply failed ({reply.error})"
    if reply.finish_reason == "length":
        return "reply cut by the length limit"
    if not reply.text.strip():
        return "empty reply"
    original = row["output"] if op == "cot" else row["instruction"]
    if reply.text.strip() == original.strip():
        return "unchanged"
    return None
