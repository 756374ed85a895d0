"""Shared fixtures: the real tokenizer, and tiny random Llama models saved as local HF folders."""
from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path

import pytest

warnings.filterwarnings("ignore", category=UserWarning)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from helpers import build_tiny_llama, write_jsonl  # noqa: F401  (re-exported for tests)

REPO = Path(__file__).resolve().parent.parent
# The converted built-in model is kept between sessions inside the repo (gitignored), never in ~/.cache.
MODEL_CACHE = REPO / ".cache" / "test-models"


def pytest_configure(config):
    """Every cache tunesmith writes goes to a fresh TUNESMITH_HOME (subprocesses inherit it); only the
    converted built-in model is shared across sessions, through a link, so a cold run converts it once."""
    home = Path(tempfile.mkdtemp(prefix="tunesmith-test-home-"))
    MODEL_CACHE.mkdir(parents=True, exist_ok=True)
    (home / "models").symlink_to(MODEL_CACHE, target_is_directory=True)
    os.environ["TUNESMITH_HOME"] = str(home)
    config._tunesmith_home = home
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # Two workers share the 2 cores: one thread each (and for their subprocesses) instead of 2 x 2 threads
        # that spin against each other.
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


def pytest_unconfigure(config):
    home = getattr(config, "_tunesmith_home", None)
    if home is not None:
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(autouse=True, scope="session")
def _no_full_gc_per_trainer():
    """accelerate runs gc.collect() every time a Trainer starts, to empty a device cache that a CPU does not
    have; in a test process holding hundreds of models that costs 0.3 s per training run."""
    from accelerate.utils import memory

    original = memory.clear_device_cache
    memory.clear_device_cache = lambda garbage_collection=False: original(False)
    yield
    memory.clear_device_cache = original


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
