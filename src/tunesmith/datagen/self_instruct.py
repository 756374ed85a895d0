"""Self-Instruct (Wang et al. 2023), following the released pipeline: grow instructions from a numbered list of
8 in-context ones (6 seeds + 2 generated once there are 2), filter them (heuristics, ROUGE-L > 0.7 against the
whole pool), ask whether each is a classification task, then write instances output-first for classification
and input-first otherwise, and apply the post-processing rules. The prompts are our own, from the paper."""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from ..errors import TunesmithError
from . import rules
from .report import StepReport
from .rouge import RougePool
from .rows import AppendLog, check_output_path, provenance, read_rows, text_id
from .step import ROW_COLUMNS, StepInfo
from .teacher import DEFAULT_MAX_TOKENS, Reply, Request, Teacher, check_max_tokens
from .teachers import TeacherSpec, as_teacher

INFO = StepInfo("self-instruct", inputs=("instruction",), outputs=ROW_COLUMNS, teacher=True)
IN_CONTEXT = 8
FROM_GENERATED = 2
NEW_PER_LIST = 7
MAX_BATCHES_WITHOUT_PROGRESS = 20

TASKS_PROMPT = ("Come up with a series of tasks. Continue the numbered list below with new tasks that differ from "
                "the ones listed, one task per line, each starting with its number.\n\n{tasks}{next}.")
CLASSIFY_PROMPT = """Can the following task be regarded as a classification task with a small, finite set of output labels? Answer Yes or No.

Task: Given a movie review, tell whether its sentiment is positive or negative.
Is it classification? Yes

Task: Write a short poem about autumn.
Is it classification? No

Task: Decide whether the following email is spam.
Is it classification? Yes

Task: Summarize the paragraph in one sentence.
Is it classification? No

Task: {instruction}
Is it classification?"""
INPUT_FIRST_PROMPT = """Come up with examples for the following task. Write several examples when possible, each as "Example N", then "Input:" and "Output:". If the task needs no additional input, write "Input: " empty and give the output directly.

Task: Convert the temperature from Celsius to Fahrenheit.
Example 1
Input: 25 degrees Celsius
Output: 77 degrees Fahrenheit
Example 2
Input: 0 degrees Celsius
Output: 32 degrees Fahrenheit

Task: {instruction}
"""
OUTPUT_FIRST_PROMPT = """Given a classification task and its possible class labels, write one example input for each class label. Write each as "Class label:" followed by the label, then the input on the next line.

Task: Tell whether the sentence expresses a positive or a negative opinion.
Class label: Positive
Input: The food was wonderful and the staff were kind.
Class label: Negative
Input: I waited an hour and the soup was cold.

Task: {instruction}
"""


@dataclass
class SelfInstructOptions:
    n: int = 100  # new instructions to add (each with its instances)
    seed: int = 0
    rouge_threshold: float = 0.7
    max_tokens: int = DEFAULT_MAX_TOKENS  # per teacher reply: a list continuation or an instruction's instances
    temperature: float = 0.7
    top_p: float = 0.5  # the released pipeline's sampling
    batch: int = 4  # prompts sent together (the teacher's concurrency bounds them)

    def check(self) -> None:
        if self.n < 1:
            raise TunesmithError(f"--n must be at least 1, got {self.n}")
        check_max_tokens(self.max_tokens)


def tasks_prompt(instructions: list[str]) -> str:
    listed = "".join(f"{i + 1}. {inst}\n" for i, inst in enumerate(instructions))
    return TASKS_PROMPT.format(tasks=listed, next=len(instructions) + 1)


def tasks_stop(instructions: list[str]) -> tuple[str, ...]:
    """Where a list continuation ends, as in the released pipeline (8 listed, stop at "16"): a blank line or
    the number after the 7th new task. A reply that stops there is complete; one cut by the length limit is not."""
    return ("\n\n", f"\n{len(instructions) + NEW_PER_LIST + 1}.")


def parse_tasks(reply: Reply, report: StepReport) -> list[str]:
    """The kept instructions of one list continuation; a reply cut by the length limit is dropped whole."""
    if reply.finish_reason == "error":
        report.drop(f"teacher reply failed ({reply.error})")
        return []
    if reply.finish_reason == "length":
        report.drop("list reply cut by the length limit")
        return []
    kept = []
    for raw in rules.split_numbered_list(reply.text):
        inst = rules.capitalize_instruction(raw)
        problem = rules.instruction_problem(inst)
        if problem:
            report.drop(problem)
        else:
            kept.append(inst)
    return kept


def instances(instruction: str, is_classification: bool, reply: Reply, report: StepReport) -> list[tuple[str, str]]:
    """(input, output) pairs after the post-processing rules; [] drops the instruction (reason counted)."""
    if reply.finish_reason == "error":
        report.drop(f"teacher reply failed ({reply.error})")
        return []
    cut = reply.finish_reason == "length"
    parse = rules.parse_classification_instances if is_classification else rules.parse_generation_instances
    pairs = parse(reply.text, cut)
    if not pairs:
        report.drop("instance reply not in the expected format")
        return []
    valid = []
    for pair in pairs:
        problem = rules.instance_problem(*pair)
        if problem:
            report.drop(problem)
        else:
            valid.append(pair)
    if rules.conflicting_outputs(valid):
        report.drop("conflicting outputs for one input", len(valid))
        return []
    return rules.unique_pairs(valid)


def self_instruct(seeds: str | Path, out: str | Path, teacher: Teacher | TeacherSpec,
                  options: SelfInstructOptions) -> StepReport:
    options.check()
    seed_rows = read_rows(seeds, need_output=INFO.needs_output, what="seed file")
    out = check_output_path(out, [seeds])
    log = AppendLog(out, INFO.name)
    teacher = as_teacher(teacher)
    report = StepReport(INFO.name, str(out), rows_in=len(seed_rows), resumed=len(log.existing))
    pool = RougePool([r["instruction"] for r in seed_rows], threshold=options.rouge_threshold)
    machine: dict[str, str] = {}  # generated instruction -> id, in order
    for row in log.existing:
        if row["instruction"] not in machine:
            machine[row["instruction"]] = text_id(row["instruction"], prefix="si-")
            pool.add(row["instruction"])
    rng = random.Random(f"{options.seed}:{len(machine)}")
    batches_without_progress = 0
    batch_no = 0
    while len(machine) < options.n and batches_without_progress < MAX_BATCHES_WITHOUT_PROGRESS:
        before = len(machine)
        _one_batch(seed_rows, machine, pool, log, teacher, options, report, rng, batch_no)
        batch_no += 1
        batches_without_progress = 0 if len(machine) > before else batches_without_progress + 1
    if len(machine) < options.n:
        report.extra["stopped"] = f"{MAX_BATCHES_WITHOUT_PROGRESS} batches in a row added no instruction"
    report.rows_out = len(log.ids)
    report.extra["instructions"] = len(machine)
    return report.finish(teacher)


def _one_batch(seed_rows, machine, pool, log, teacher, options, report, rng, batch_no) -> None:
    requests, sources = [], []
    base_seed = options.seed * 1_000_003 + batch_no * 1_009 + len(machine) * 31
    for k in range(options.batch):
        picked = _in_context(seed_rows, machine, rng)
        listed = [text for text, _ in picked]
        requests.append(Request([{"role": "user", "content": tasks_prompt(listed)}], options.max_tokens,
                                options.temperature, options.top_p, seed=base_seed + k, stop=tasks_stop(listed)))
        sources.append([i for _, i in picked])
    replies = teacher.generate(requests)
    new: list[tuple[str, list[str]]] = []
    for reply, source_ids in zip(replies, sources):
        for inst in parse_tasks(reply, report):
            if len(machine) + len(new) >= options.n:
                break
            if pool.add_if_novel(inst):
                new.append((inst, source_ids))
            else:
                report.drop(f"ROUGE-L > {options.rouge_threshold} with an instruction in the pool")
    if not new:
        return
    verdicts = teacher.generate([Request([{"role": "user", "content": CLASSIFY_PROMPT.format(instruction=inst)}],
                                         8, 0.0, 1.0, seed=base_seed) for inst, _ in new])
    is_clf = [rules.is_yes(v.text) is True for v in verdicts]
    prompts = [(OUTPUT_FIRST_PROMPT if clf else INPUT_FIRST_PROMPT).format(instruction=inst)
               for (inst, _), clf in zip(new, is_clf)]
    replies = teacher.generate([Request([{"role": "user", "content": p}], options.max_tokens, 0.0, 1.0,
                                        seed=base_seed) for p in prompts])
    for (inst, source_ids), clf, reply in zip(new, is_clf, replies):
        pairs = instances(inst, clf, reply, report)
        if not pairs:
            report.drop("instruction left with no valid instance")
            continue
        inst_id = text_id(inst, prefix="si-")
        log.append_many([{  # one write: a kill leaves all of an instruction's instances or none
            "id": text_id(inst, inst_input, prefix=f"{inst_id}-"), "instruction": inst, "input": inst_input,
            "output": inst_output, "classification": clf,
            "provenance": provenance(INFO.name, "output-first" if clf else "input-first", teacher.name, source_ids),
        } for inst_input, inst_output in pairs])
        machine[inst] = inst_id


def _in_context(seed_rows: list[dict], machine: dict[str, str], rng: random.Random) -> list[tuple[str, str]]:
    """8 (text, id) pairs: 2 generated ones once there are 2, the rest seeds, shuffled."""
    generated = list(machine.items()) if len(machine) >= FROM_GENERATED else []
    picked = rng.sample(generated, FROM_GENERATED) if generated else []
    seeds = [(r["instruction"], r["id"]) for r in seed_rows]
    picked += rng.sample(seeds, min(IN_CONTEXT - len(picked), len(seeds)))
    rng.shuffle(picked)
    return picked
