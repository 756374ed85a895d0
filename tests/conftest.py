"""Shared fixtures: the real tokenizer, and tiny random Llama models saved as local HF folders."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest

warnings.filterwarnings("ignore", category=UserWarning)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from helpers import build_tiny_llama, write_jsonl  # noqa: F401  (re-exported for tests)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tokenizer():
    from tunesmith.models import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizer)


@pytest.fixture
def booking_rows():
    from tunesmith.demo.booking import generate

    train, held_out = generate(n_train=24, n_eval=8, seed=1)
    return train, held_out


@pytest.fixture
def tiny_recipe(tmp_path, tiny_model_dir, booking_rows):
    """A recipe dict that trains the tiny model a few steps on booking data, writing under tmp_path."""
    train, held_out = booking_rows
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "eval.jsonl", held_out)
    return {
        "model": str(tiny_model_dir),
        "data": {"train": str(tmp_path / "train.jsonl"), "eval": str(tmp_path / "eval.jsonl"), "max_length": 256},
        "method": {"name": "lora", "r": 4, "alpha": 8},
        "train": {"max_steps": 4, "batch_size": 4, "lr": 1e-3, "logging_steps": 1, "save_steps": 2, "bf16": False},
        "eval": {"scorer": "json_match", "max_new_tokens": 8, "batch_size": 4, "limit": 4},
        "output_dir": str(tmp_path / "run"),
    }


@pytest.fixture(autouse=True)
def _general_answers_in_tmp(tmp_path_factory, monkeypatch):
    """Cached base-model answers (eval --forgetting) go to a temp folder, not the user's cache."""
    from tunesmith.evaluate import general_questions

    home = tmp_path_factory.getbasetemp() / "tunesmith-home"
    monkeypatch.setattr(general_questions, "tunesmith_home", lambda: home)
