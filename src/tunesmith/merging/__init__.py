"""Model merging: linear, SLERP, task arithmetic, TIES, DARE; streaming, for full models and LoRA adapters.

    import tunesmith
    tunesmith.merge("recipes/merge-ties.yaml", "merged/")

`methods` holds the math as pure tensor functions, `spec` the YAML schema, `io` the streaming
safetensors reader and sharded writer, `sources` full-model and adapter inputs, `run` the engine.
"""
from __future__ import annotations

from .run import MergePlan, merge, plan_merge
from .spec import MergeSpec, load_merge_spec

__all__ = ["MergePlan", "MergeSpec", "load_merge_spec", "merge", "plan_merge"]
