"""What a user sees of their data before training: the token table, the stats, and the pre-flight check."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import RunConfig
from ..errors import TunesmithError
from ..objectives import get_objective
from .assemble import hold_out, prepare_data, untagged
from .loading import load_rows
from .masking import END_OF_TURN, IGNORE_INDEX, TokenizedExample, tokenize_conversation
from .prefixes import load_task_conversations
from .preference import PreferenceExample, to_preference_pair, tokenize_pair
from .templates import apply_template_override, marks_roles


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    """Per-token text whose concatenation is the decoded sequence; a multi-byte character split over
    several tokens is shown on the token that completes it."""
    texts, start = [], 0
    for i in range(len(ids)):
        piece = tokenizer.decode(ids[start : i + 1], skip_special_tokens=False)
        if piece.endswith("\ufffd") and i + 1 < len(ids):
            texts.append("")
            continue
        texts.append(piece)
        start = i + 1
    return texts


def inspect_examples(config: RunConfig, tokenizer, n: int = 2) -> list[dict]:
    """The first n training examples, as training receives them (task prefixes, mixing and replay included),
    as token tables: id, text, whether it carries loss, and why."""
    out = []
    for index, ex in enumerate(prepare_data(config, tokenizer).train[:n]):
        # a preference pair is shown as its two sequences, each with the reply that carries log-probs
        sides = [(f"{ex.where} chosen", ex.chosen), (f"{ex.where} rejected", ex.rejected)] if isinstance(
            ex, PreferenceExample) else [(ex.where, ex)]
        for where, seq in sides:
            texts = token_texts(tokenizer, seq.input_ids)
            tokens = [
                {"id": tid, "text": text, "loss": label != IGNORE_INDEX, "why": why}
                for tid, text, label, why in zip(seq.input_ids, texts, seq.labels, seq.categories)
            ]
            out.append({"index": index, "where": where, "truncated": seq.truncated, "tokens": tokens})
    return out


def data_stats(config: RunConfig, tokenizer) -> dict:
    """The counts of what training receives: the same dict a run writes to data_stats.json."""
    return prepare_data(config, tokenizer).stats()


@dataclass
class Finding:
    level: str  # "error" fails the check; "warning" and "info" do not
    where: str
    message: str


def ends_with_supervised_end_of_turn(ex: TokenizedExample) -> bool:
    supervised = [i for i, label in enumerate(ex.labels) if label != IGNORE_INDEX]
    return bool(supervised) and any(ex.categories[i] == END_OF_TURN for i in supervised[-3:])


def check_data(config: RunConfig, tokenizer) -> list[Finding]:
    """Pre-flight doctor: every problem that would make training silently learn the wrong thing."""
    findings: list[Finding] = []
    try:
        apply_template_override(tokenizer, config.data.chat_template)
    except TunesmithError as exc:
        return [Finding("error", "data.chat_template", str(exc))]
    if not marks_roles(tokenizer):
        findings.append(Finding(
            "error", "chat template",
            "the template renders user and assistant messages the same way, so the model cannot tell who speaks; "
            "set data.chat_template to a template that marks roles",
        ))
    if get_objective(config.train.objective).preference:
        return findings + _check_pairs(tokenizer, config)
    loaded = {}
    for key, which in [("data.train", "train")] + ([("data.eval", "eval")] if config.data.eval else []):
        try:
            loaded[which] = load_task_conversations(config, which)  # task prefixes on, as training sees them
        except TunesmithError as exc:
            findings.append(Finding("error", key, str(exc)))
    if "train" in loaded:
        train, _ = hold_out(config, loaded["train"], loaded.get("eval", []))
        findings.extend(_check_examples(tokenizer, untagged(train), config))
    if "eval" in loaded:
        findings.extend(_check_examples(tokenizer, untagged(loaded["eval"]), config))
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id == tokenizer.eos_token_id:
        findings.append(Finding(
            "info", "tokenizer",
            f"pad token == eos token ({tokenizer.eos_token!r}). Masking labels by token id (as many guides do) would "
            "also mask the real end of turn and the model would never learn to stop; tunesmith masks padding by position.",
        ))
    return findings


def _check_pairs(tokenizer, config: RunConfig) -> list[Finding]:
    """Every bad preference row (not only the first), and pairs whose replies would not teach the model to stop."""
    findings, too_long, total = [], 0, 0
    sources = [("data.train", config.data.train)] + ([("data.eval", config.data.eval)] if config.data.eval else [])
    for key, source in sources:
        try:
            rows = load_rows(source, config.data.split)
        except TunesmithError as exc:
            findings.append(Finding("error", key, str(exc)))
            continue
        for row in rows:
            total += 1
            try:
                ex = tokenize_pair(tokenizer, to_preference_pair(row, config.data.system_prompt), config.data.max_length,
                                   config.data.truncation)
            except TunesmithError as exc:
                findings.append(Finding("error", row.where, str(exc)))
                continue
            if ex is None:
                too_long += 1
                continue
            for side, seq in (("chosen", ex.chosen), ("rejected", ex.rejected)):
                if not ends_with_supervised_end_of_turn(seq):
                    findings.append(Finding("error", row.where, f"the {side} reply's end-of-turn token carries no "
                                            "log-prob (truncated at data.max_length?): the pair compares cut replies"))
    if too_long:
        findings.append(Finding("warning", "data", f"{too_long} of {total} pairs are longer than data.max_length="
                                f"{config.data.max_length} (prompt + the longer reply) and will be dropped; raise "
                                "data.max_length"))
    return findings


def _check_examples(tokenizer, convs, config: RunConfig) -> list[Finding]:
    findings = []
    too_long = 0
    for conv, where in convs:
        try:
            ex = tokenize_conversation(tokenizer, conv, config.data.train_on, config.data.max_length, config.data.truncation, where)
        except TunesmithError as exc:
            findings.append(Finding("error", where, str(exc)))
            continue
        if ex is None:
            too_long += 1
            continue
        if ex.num_supervised == 0:
            findings.append(Finding("error", where, "no token carries loss: the example teaches nothing"))
        elif not ends_with_supervised_end_of_turn(ex):
            reason = " (it was truncated at data.max_length)" if ex.truncated else ""
            findings.append(Finding(
                "error", where,
                f"the last assistant turn's end-of-turn token carries no loss{reason}: the model will not learn to stop",
            ))
    if too_long:
        findings.append(Finding(
            "warning", "data",
            f"{too_long} of {len(convs)} examples are longer than data.max_length={config.data.max_length} and will be "
            "dropped; raise data.max_length or set data.truncation: truncate",
        ))
    return findings


