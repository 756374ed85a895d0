"""General questions answered by the base model itself: did fine-tuning change how the model answers them?

The base model answers a fixed set of everyday questions once, greedily; the answers are cached under
`$TUNESMITH_HOME/general-answers/` (keyed by the base model, its chat template and the questions), so every
later report compares against the same reference without generating it again. Two measures:

- answer perplexity: the fine-tuned model's perplexity on the base model's own answers (answer tokens only).
  The base scores low on its own greedy answers; a rise means the fine-tuned model no longer expects them.
- same answers: the share of questions where the fine-tuned model's greedy answer equals the base's word for word.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

from ..data.masking import tokenize_conversation
from ..data.templates import render
from ..inference import generate_answers
from ..paths import tunesmith_home
from .perplexity import supervised_nll

MAX_NEW_TOKENS = 48
BATCH_SIZE = 16

QUESTIONS = [
    "What is the capital of France?",
    "How many days are there in a leap year?",
    "What is 12 multiplied by 7?",
    "Name three primary colors.",
    "Why is the sky blue?",
    "What does a thermometer measure?",
    "Give me a synonym for 'happy'.",
    "What is the boiling point of water at sea level in Celsius?",
    "Write one sentence about the ocean.",
    "What is the largest planet in our solar system?",
    "How do plants make their food?",
    "What is the opposite of 'cold'?",
    "Translate 'thank you' into Spanish.",
    "Who wrote 'Romeo and Juliet'?",
    "What is the square root of 81?",
    "Give one tip for sleeping better.",
    "What is a noun?",
    "How many continents are there?",
    "What gas do humans need to breathe?",
    "Suggest a name for a pet cat.",
    "What is the freezing point of water in Fahrenheit?",
    "Explain what a computer program is in one sentence.",
    "What is the main ingredient of bread?",
    "How many legs does a spider have?",
    "What is the past tense of 'run'?",
    "Name a fruit that is yellow.",
    "What does the heart do?",
    "Why do we have seasons?",
    "What is 100 divided by 4?",
    "Write a short greeting for a birthday card.",
    "What language is spoken in Brazil?",
    "What is photosynthesis?",
]


def _conversation(question: str, answer: str | None = None) -> list[dict]:
    conv = [{"role": "user", "content": question}]
    return conv + [{"role": "assistant", "content": answer}] if answer is not None else conv


def answer_questions(model, tokenizer, questions: list[str] = QUESTIONS) -> list[str]:
    prompts = [render(tokenizer, _conversation(q), add_generation_prompt=True) for q in questions]
    return generate_answers(model, tokenizer, prompts, MAX_NEW_TOKENS, BATCH_SIZE)


def cache_path(base_label: str, tokenizer, questions: list[str] = QUESTIONS) -> Path:
    """One cache file per base model, chat template and question set."""
    key = json.dumps([base_label, getattr(tokenizer, "chat_template", None), questions, MAX_NEW_TOKENS])
    return tunesmith_home() / "general-answers" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def base_answers(base_model, tokenizer, base_label: str, questions: list[str] = QUESTIONS) -> list[str]:
    """The base model's greedy answers, generated once per base model and read from the cache after that."""
    path = cache_path(base_label, tokenizer, questions)
    if path.exists():
        return json.loads(path.read_text())["answers"]
    answers = answer_questions(base_model, tokenizer, questions)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"model": base_label, "questions": questions, "answers": answers}, indent=1))
    tmp.replace(path)  # concurrent reports never read a half-written file
    return answers


def answer_perplexity(model, tokenizer, questions: list[str], answers: list[str]) -> dict:
    """Perplexity of `answers` under `model`: answer tokens and the end-of-turn marker (so an empty answer counts too)."""
    examples = [tokenize_conversation(tokenizer, _conversation(q, a), "last_assistant") for q, a in zip(questions, answers)]
    nll = supervised_nll(model, [e for e in examples if e is not None and e.num_supervised], tokenizer.pad_token_id)
    return {"nll": nll["eval_loss"], "perplexity": nll["perplexity"], "tokens": nll["eval_tokens"]}


def same_answer_share(answers: list[str], reference: list[str]) -> float:
    return sum(a == r for a, r in zip(answers, reference)) / len(reference) if reference else math.nan
