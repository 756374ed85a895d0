"""Model merging: linear, SLERP, task arithmetic, TIES, DARE; streaming, for full models and LoRA adapters.

    import tunesmith
    tunesmith.merge("recipes/merge-ties.yaml", "merged/")

`methods` holds the math as pure tensor functions, `spec` the YAML schema, `io` the streaming
safetensors reader and sharded writer, `sources` full-model and adapter inputs, `run` the engine.
"""
from __future__ import annotations

import sys
import types

from .run import MergePlan, merge, plan_merge
from .spec import MergeSpec, load_merge_spec

__all__ = ["MergePlan", "MergeSpec", "load_merge_spec", "merge", "plan_merge"]


class _CallableModule(types.ModuleType):
    """Importing `tunesmith.merge.*` makes the attribute `tunesmith.merge` this package rather than the
    function; calling the package calls the function, so `tunesmith.merge(spec, out)` always works."""

    def __call__(self, *args, **kwargs):
        return merge(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
