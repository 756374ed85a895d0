"""tunesmith: fine-tune your own language model end to end.

The CLI is a thin layer over these functions, so a notebook can call them directly:

    import tunesmith
    cfg = tunesmith.load_config("recipes/quickstart.yaml", ["train.max_steps=20"])
    run = tunesmith.train(cfg, overwrite=True)
    print(tunesmith.evaluate(str(run.output_dir)))
"""
from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

_EXPORTS = {
    "load_config": ".config",
    "RunConfig": ".config",
    "TunesmithError": ".errors",
    "train": ".train.run",
    "evaluate": ".evaluate.run",
    "export": ".export",
    "merge": ".merge.run",
    "ChatSession": ".chat",
    "load_for_inference": ".inference",
    "load_model": ".models",
    "load_tokenizer": ".models",
    "inspect_examples": ".data.report",
    "data_stats": ".data.report",
    "check_data": ".data.report",
    "plan": ".plan",
}
__all__ = sorted(_EXPORTS)


class _Package(types.ModuleType):
    """Importing the subpackage `tunesmith.train` must not replace the function `tunesmith.train`.

    Python binds a subpackage as an attribute of its parent when it is first imported; for the API
    names that are also subpackage names (train, evaluate, merge) we keep the attribute lookup going
    through `__getattr__`, which returns the function.
    """

    def __setattr__(self, name, value):
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    # Lazy, so `tunesmith --help` does not import torch.
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'tunesmith' has no attribute {name!r}")
