"""GaLore: full-parameter training whose Adam moments live in a rank-r projection of each targeted matrix.

The method brings its own optimizer (galore-torch through transformers' `optim`); the run folder holds a
whole model.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import TunesmithError
from .base import PreparedModel, save_full_model
from .method import Method

if TYPE_CHECKING:
    from ..config import RunConfig

DEFAULT_TARGETS = [r".*self_attn.*", r".*mlp.*"]
OPTIMIZER = "galore"  # the optimizer family `plan --optimizer` names; galore-torch's optimizers


def prepare_galore(model, config: RunConfig, total_steps: int = 0) -> PreparedModel:
    try:
        import galore_torch  # noqa: F401 - optional dependency, checked before training starts
    except ImportError as exc:
        raise TunesmithError("method.name=galore needs galore-torch: pip install galore-torch") from exc
    m = config.method
    for p in model.parameters():
        p.requires_grad_(True)
    targets = DEFAULT_TARGETS if m.target_modules == "all-linear" else list(m.target_modules)
    args = {
        "optim": m.galore_optim,
        "optim_target_modules": targets,
        "optim_args": f"rank={m.galore_rank}, update_proj_gap={m.update_proj_gap}, scale={m.galore_scale}",
    }
    return PreparedModel(model, [], save_full_model(model), training_args=args)


METHOD = Method(
    name="galore",
    when="full-parameter quality with low-rank optimizer memory",
    key_options="galore_rank, update_proj_gap, galore_scale, galore_optim, target_modules",
    options=("target_modules", "galore_rank", "update_proj_gap", "galore_scale", "galore_optim"),
    prepare=prepare_galore,
    rank_option="galore_rank",
    lr=1e-4,
    optimizer=OPTIMIZER,
    warm_imports=("galore_torch",),
)
