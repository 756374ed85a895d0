"""tunesmith: fine-tune your own language model end to end.

The CLI is a thin layer over these functions, so a notebook can call them directly:

    import tunesmith
    cfg = tunesmith.load_config("recipes/quickstart.yaml", ["train.max_steps=20"])
    run = tunesmith.train(cfg, overwrite=True)
    print(tunesmith.evaluate(str(run.output_dir)))
"""
from __future__ import annotations

import importlib
import os

__version__ = "0.1.0"

# torch's OpenMP threads (libgomp) spin 300,000 times waiting for work before they sleep. With a second
# process on the cores, the two processes' spinning threads take turns and a training step took 11x as
# long; 1,000 spins cost a lone run nothing measurable and bring a pair to 2x (bench/cpu_sharing.py, README
# "Sharing the CPU"). libgomp reads it once, when torch loads: a user's own setting wins.
os.environ.setdefault("GOMP_SPINCOUNT", "1000")

_EXPORTS = {
    "load_config": ".config",
    "RunConfig": ".config",
    "TunesmithError": ".errors",
    "train": ".training.run",
    "evaluate": ".evaluation.run",
    "export": ".exporting",
    "merge": ".merging.run",
    "ChatSession": ".chat",
    "load_for_inference": ".inference",
    "load_model": ".models",
    "load_tokenizer": ".models",
    "inspect_examples": ".data.report",
    "data_stats": ".data.report",
    "check_data": ".data.report",
    "plan": ".planning",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    # Lazy, so `tunesmith --help` does not import torch.
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'tunesmith' has no attribute {name!r}")
