"""The text rules of Self-Instruct and Evol-Instruct as pure functions on strings, each returning the reason a
piece of text is dropped (None to keep it), so every rule is tested on fixed strings and every drop is counted.

Self-Instruct: Wang et al. 2023, the released pipeline (yizhongw/self-instruct: bootstrap_instructions.py,
prepare_for_finetuning.py). Evol-Instruct: Xu et al. 2023 (WizardLM), section 3.3, the elimination rules.
"""
from __future__ import annotations

import re
import string
from typing import Optional

# Tasks a text-only model cannot do, matched as whole words (case-insensitive).
UNSUITABLE_WORDS = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
                    "draw", "plot", "go to")
NUMBERED_ITEM = re.compile(r"\n\d+\s?\. ")
LEADING_NUMBER = re.compile(r"^\s*\d+\s?\.\s*")


def split_numbered_list(reply: str) -> list[str]:
    """The instructions of a numbered-list continuation: the reply continues after the prompt's "9.", so its
    first item has no number, unless a chat model repeats it, which is stripped."""
    text = LEADING_NUMBER.sub("", reply, count=1)
    return [re.sub(r"\s+", " ", item).strip() for item in NUMBERED_ITEM.split(text)]


def instruction_problem(inst: str) -> Optional[str]:
    """Self-Instruct's heuristics for a generated instruction (already whitespace-normalised)."""
    if not inst:
        return "empty instruction"
    words = len(inst.split())
    if words <= 3:
        return "instruction of 3 words or fewer"
    if words > 150:
        return "instruction over 150 words"
    if any(re.search(rf"\b{word}\b", inst, flags=re.IGNORECASE) for word in UNSUITABLE_WORDS):
        return "keyword a text model cannot serve (image, file, draw, ...)"
    if inst.startswith("Write a program"):
        return "starts with 'Write a program'"
    if inst[0] in string.punctuation:
        return "starts with punctuation"
    if not inst[0].isascii():
        return "starts with a non-ASCII character"
    return None


def capitalize_instruction(inst: str) -> str:
    """The released pipeline capitalises with str.capitalize (which also lower-cases the rest)."""
    return inst.strip().capitalize()


# ---- instances ------------------------------------------------------------------------------------
OUTPUT_LABEL = re.compile(r"Output\s*\d*\s*:")
INPUT_LABEL = re.compile(r"Input\s*\d*\s*:")
EXAMPLE_LABEL = re.compile(r"Example\s?\d*\.?")


def parse_input_output(text: str) -> tuple[str, str]:
    if OUTPUT_LABEL.search(text):
        parts = OUTPUT_LABEL.split(text)
        inst_input, inst_output = parts[0].strip(), parts[1].strip()
    else:
        inst_input, inst_output = "", text.strip()
    if INPUT_LABEL.search(inst_output):  # several pairs in one: keep the first output
        inst_output = INPUT_LABEL.split(inst_output)[0].strip()
    return re.sub(r"^Input\s*\d*\s*:", "", inst_input).strip(), inst_output


def parse_generation_instances(reply: str, cut: bool) -> list[tuple[str, str]]:
    """Input-first instances: "Example 1 / Input: ... / Output: ..." blocks, or a single Output: pair."""
    reply = reply.strip()
    if EXAMPLE_LABEL.search(reply):
        pairs = [parse_input_output(t) for t in (t.strip() for t in EXAMPLE_LABEL.split(reply)) if t]
    elif OUTPUT_LABEL.search(reply):
        pairs = [parse_input_output(reply)]
    else:
        return []
    return pairs[:-1] if cut else pairs  # the last instance of a reply cut by the length limit is incomplete


def parse_classification_instances(reply: str, cut: bool) -> list[tuple[str, str]]:
    """Output-first instances: "Class label: X" then the input on the following lines; (input, label) pairs."""
    if "Class label:" not in reply:
        return []
    pairs = []
    for block in reply.split("Class label:")[1:]:
        label, _, rest = block.strip().partition("\n")
        pairs.append((re.sub(r"^Input\s*\d*\s*:", "", rest.strip()).strip(), label.strip()))
    return pairs[:-1] if cut else pairs


def instance_problem(inst_input: str, inst_output: str) -> Optional[str]:
    if inst_input == inst_output:
        return "instance input equals output"
    if inst_output == "":
        return "instance with empty output"
    if inst_input.strip().endswith(":") or inst_output.strip().endswith(":"):
        return "instance ending with ':' (incomplete)"
    return None


def conflicting_outputs(pairs: list[tuple[str, str]]) -> bool:
    """Two instances with the same non-empty input and different outputs: the task is ill-defined."""
    seen: dict[str, str] = {}
    for inst_input, inst_output in pairs:
        if inst_input == "":
            continue
        if seen.setdefault(inst_input, inst_output) != inst_output:
            return True
    return False


def unique_pairs(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return list(dict.fromkeys(pairs))


def is_yes(reply: str) -> Optional[bool]:
    """A Yes/No judgement; None when the reply is neither."""
    head = reply.strip().lower().lstrip("*#\"' ")
    if head.startswith("yes"):
        return True
    if head.startswith("no"):
        return False
    return None


# ---- Evol-Instruct elimination -------------------------------------------------------------------
STOP_WORDS = frozenset("""a an the and or but if then else of to in on at by for with from as is are was were be been
being it its this that these those i you he she we they me him her us them my your our their not no yes do does did
so too very can will just than there here what which who whom how why when where all any some""".split())
LEAKS = ("given prompt", "rewritten prompt", "#rewritten prompt#", "#given prompt#", "#created prompt#",
         "created prompt", "#the given prompt#")


def evolved_problem(original: str, evolved: str) -> Optional[str]:
    if not evolved.strip():
        return "empty evolved instruction"
    if any(leak in evolved.lower() for leak in LEAKS):
        return "copies words of the evolving prompt (prompt leakage)"
    if evolved.strip() == original.strip():
        return "no information gain (unchanged)"
    return None


def answer_problem(answer: str) -> Optional[str]:
    if "sorry" in answer.lower() and len(answer.split()) < 80:
        return "answer says 'sorry' and is short (under 80 words)"
    words = re.findall(r"[A-Za-z0-9']+", answer.lower())
    if all(w in STOP_WORDS for w in words):
        return "answer is only punctuation and stop words"
    return None
