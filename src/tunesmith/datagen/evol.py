"""Evol-Instruct (Xu et al. 2023, WizardLM): each round rewrites every instruction in the pool with one operator
chosen at random (five in-depth ones and in-breadth), answers it, and eliminates failures by the paper's four
rules: no information gain (judged by the teacher), a short "sorry" answer, an answer of only punctuation and
stop words, and prompt leakage. A failed instruction returns to the pool unchanged for the next round.
The prompts are our own, from the paper's description."""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from ..errors import TunesmithError
from . import rules
from .report import StepReport
from .rows import AppendLog, check_output_path, provenance, read_rows, stable_seed
from .step import ROW_COLUMNS, StepInfo
from .teacher import DEFAULT_MAX_TOKENS, Request, Teacher, check_max_tokens
from .teachers import TeacherSpec, as_teacher

INFO = StepInfo("evol", inputs=("instruction",), outputs=ROW_COLUMNS, teacher=True)

DEPTH_FRAME = ("You rewrite a given prompt into a more complex version that a capable assistant would find harder, "
               "while it stays reasonable, understandable and answerable by a human. Keep any table or code in it. "
               "{method} Add no more than 10 to 20 words. Reply with the rewritten prompt only.\n\nPrompt:\n{prompt}")
OPERATORS = {
    "add-constraints": DEPTH_FRAME.replace("{method}", "Add one more constraint or requirement to it."),
    "deepen": DEPTH_FRAME.replace("{method}", "If it asks about a specific issue, increase the depth and breadth of "
                                              "the inquiry."),
    "concretize": DEPTH_FRAME.replace("{method}", "Replace general concepts with more specific ones."),
    "increase-reasoning": DEPTH_FRAME.replace("{method}", "If it can be solved with a few simple steps of thinking, "
                                                          "rewrite it to explicitly ask for multi-step reasoning."),
    "complicate-input": DEPTH_FRAME.replace("{method}", "Add a concrete input to work on (data, a short text, a "
                                                        "table or code) that makes it harder."),
    "breadth": ("Draw inspiration from the given prompt to create a brand-new prompt in the same domain but about a "
                "rarer topic, of similar length and difficulty, understandable and answerable by a human. Reply with "
                "the new prompt only.\n\nPrompt:\n{prompt}"),
}
EQUAL_PROMPT = ("Are these two instructions equal, that is, do they have the same constraints and requirements and "
                "the same depth and breadth of inquiry? Answer only Equal or Not Equal.\n\nFirst instruction:\n{a}\n\n"
                "Second instruction:\n{b}")


@dataclass
class EvolOptions:
    rounds: int = 1
    seed: int = 0
    max_tokens: int = DEFAULT_MAX_TOKENS  # per teacher reply: a rewritten instruction or its answer
    temperature: float = 0.7

    def check(self) -> None:
        if self.rounds < 1:
            raise TunesmithError(f"--rounds must be at least 1, got {self.rounds}")
        check_max_tokens(self.max_tokens)


@dataclass
class Lineage:
    seed_id: str
    instruction: str  # the current (last successful) instruction


def evol(seeds: str | Path, out: str | Path, teacher: Teacher | TeacherSpec, options: EvolOptions) -> StepReport:
    options.check()
    seed_rows = read_rows(seeds, need_output=INFO.needs_output, what="seed file")
    out = check_output_path(out, [seeds])
    log = AppendLog(out, INFO.name)
    teacher = as_teacher(teacher)
    done = {r["id"]: r for r in log.existing}
    report = StepReport(INFO.name, str(out), rows_in=len(seed_rows), resumed=len(log.existing))
    pool = [Lineage(r["id"], _prompt(r)) for r in seed_rows]
    for round_ in range(1, options.rounds + 1):
        todo = []
        for lineage in pool:
            written = done.get(evol_id(lineage.seed_id, round_))
            if written is not None:
                lineage.instruction = written["instruction"]
            elif not any(evol_id(lineage.seed_id, later) in done for later in range(round_ + 1, options.rounds + 1)):
                todo.append(lineage)  # (a later round on file means this one failed before: not redone)
        _evolve(todo, round_, log, teacher, options, report)
    report.rows_out = len(log.ids)
    return report.finish(teacher)


def evol_id(seed_id: str, round_: int) -> str:
    return f"evol-{seed_id}-r{round_}"


def _prompt(row: dict) -> str:
    return f"{row['instruction']}\n\n{row['input']}" if row["input"].strip() else row["instruction"]


def pick_operator(seed: int, seed_id: str, round_: int) -> str:
    """The same lineage and round pick the same operator in every run."""
    return random.Random(f"{seed}:{seed_id}:{round_}").choice(sorted(OPERATORS))


def _evolve(todo: list[Lineage], round_: int, log: AppendLog, teacher: Teacher, options: EvolOptions,
            report: StepReport) -> None:
    if not todo:
        return
    seeds = [stable_seed(options.seed, t.seed_id, round_) for t in todo]
    ops = [pick_operator(options.seed, t.seed_id, round_) for t in todo]
    rewrites = teacher.generate([
        Request(_user(OPERATORS[op].format(prompt=t.instruction)), options.max_tokens, options.temperature, seed=s)
        for t, op, s in zip(todo, ops, seeds)])
    candidates = []
    for lineage, op, seed, reply in zip(todo, ops, seeds, rewrites):
        evolved = reply.text.strip()
        problem = _reply_problem(reply) or rules.evolved_problem(lineage.instruction, evolved)
        if problem:
            report.drop(problem)
        else:
            candidates.append((lineage, op, seed, evolved))
    answers = teacher.generate([Request(_user(e), options.max_tokens, options.temperature, seed=s)
                                for _, _, s, e in candidates])
    judgements = teacher.generate([Request(_user(EQUAL_PROMPT.format(a=lin.instruction, b=e)), 8, 0.0, seed=s)
                                   for lin, _, s, e in candidates])
    for (lineage, op, _, evolved), answer, judgement in zip(candidates, answers, judgements):
        problem = (_reply_problem(answer) or _gain_problem(judgement.text) or rules.answer_problem(answer.text))
        if problem:
            report.drop(problem)
            continue  # the lineage keeps its instruction for the next round
        log.append({"id": evol_id(lineage.seed_id, round_), "instruction": evolved, "input": "",
                    "output": answer.text.strip(),
                    "provenance": provenance(INFO.name, op, teacher.name, [lineage.seed_id], round_)})
        lineage.instruction = evolved


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _reply_problem(reply) -> str | None:
    if reply.finish_reason == "error":
        return f"teacher reply failed ({reply.error})"
    if reply.finish_reason == "length":
        return "reply cut by the length limit"
    return None


def _gain_problem(judgement: str) -> str | None:
    head = judgement.strip().lower().lstrip("*#\"' ")
    if head.startswith("equal"):
        return "no information gain (teacher judged it equal)"
    if not head.startswith("not equal"):
        return "malformed equality judgement"
    return None
