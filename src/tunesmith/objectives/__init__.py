"""Training objectives: one module per objective, each declaring one registry entry (objective.py, registry.py).

`sft` is next-token cross-entropy; `dpo`, `orpo` and `simpo` learn from preference pairs. Each preference
entry's loss is a pure function of per-sequence completion log-probs and token counts. Importing this
package loads no torch.
"""
from __future__ import annotations

from .objective import Objective, ObjectiveOutput, PairLogps
from .registry import DEFAULT_OBJECTIVE, OBJECTIVES, get_objective, objectives_accepting

__all__ = ["DEFAULT_OBJECTIVE", "OBJECTIVES", "Objective", "ObjectiveOutput", "PairLogps", "get_objective",
           "objectives_accepting"]
