"""Answers that never stop or repeat themselves (the guide's Q4), traced back to the data: does every example's
final end-of-turn token carry loss? Pure functions over eval samples and tokenized examples."""
from __future__ import annotations

from .findings import Finding


def end_of_turn_unsupervised(examples, ends_supervised) -> Finding | None:
    """Examples whose final end-of-turn token carries no loss: the model is never taught to stop.
    `ends_supervised(example) -> bool` is the data layer's check (data/report.py)."""
    missing = [ex for ex in examples if not ends_supervised(ex)]
    if not missing:
        return None
    return Finding(
        code="end_of_turn_unsupervised",
        message=f"{len(missing)} of {len(examples)} training examples end without a supervised end-of-turn token",
        cause="the model is never taught to stop, so its answers will run until max_new_tokens",
        remedy=_data_remedy(),
        example_ids=[ex.where for ex in missing[:5]],
    )


def _data_remedy() -> str:
    return ("use a chat template that closes every turn with the end-of-turn token (data.chat_template), keep the "
            "end-of-turn token in the labels (pad == eos masked by id is the usual culprit; tunesmith masks padding by "
            "position), and drop rather than truncate long examples (data.truncation: drop); `tunesmith data check` must pass")


def repeats(text: str, n: int = 3) -> bool:
    """An answer that loops: fewer than half of its word n-grams are distinct (at least 8 n-grams)."""
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(grams) >= 8 and len(set(grams)) < len(grams) / 2


def runaway_answers(samples: list[dict], max_new_tokens: int, eot_finding: Finding | None) -> Finding | None:
    """Most answers hit `max_new_tokens` without a stop token, or repeat themselves. `samples` carry `prediction`
    and `stopped` (the answer ended with a stop token); `eot_finding` is end_of_turn_unsupervised on the data."""
    if not samples:
        return None
    runaway = [s for s in samples if not s.get("stopped", True)]
    looping = [s for s in samples if repeats(s["prediction"])]
    if len(runaway) * 2 < len(samples) and len(looping) * 2 < len(samples):
        return None
    seen = (f"{len(runaway)} of {len(samples)} answers hit max_new_tokens={max_new_tokens} without the end-of-turn token"
            if runaway else f"{len(looping)} of {len(samples)} answers repeat themselves")
    if eot_finding is not None:
        cause = f"the data: {eot_finding.message}, so the model never learned to stop"
        remedy = _data_remedy()
    else:
        cause = ("the data supervises the end of turn, so the model has not learned it yet (too few steps or too low a "
                 "learning rate), or generation pads on the wrong side (pad left for batched generation)")
        remedy = "train longer or raise train.lr into the guide's range; generate with left padding and the tokenizer's eos as a stop token"
    return Finding(code="runaway_answers", message=seen, cause=cause, remedy=remedy)
