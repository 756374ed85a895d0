"""DoRA through PEFT: LoRA whose update is split into a trained magnitude and a direction.

W' = m * (W0 + s B A) / ||W0 + s B A||, the norm taken per output feature, m a trained vector (d_out);
PEFT implements the paper's formula (tests/test_methods.py checks it). Training runs each layer as one
`fused_dora.DoraBranch` (train.fused_lora), which assembles the norm from low-rank terms.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .base import PreparedModel
from .lora import LORA_OPTIONS, lora_saves, lora_tensors, prepare_lora
from .method import AdapterBill, AdapterSaves, Method, Workspace

if TYPE_CHECKING:
    from ..config import RunConfig


def prepare_dora(model, config: RunConfig, total_steps: int = 0) -> PreparedModel:
    return prepare_lora(model, config, use_dora=True)


def dora_tensors(r: int, name: str, d_in: int, d_out: int) -> list[int]:
    return lora_tensors(r, name, d_in, d_out) + [d_out]  # + the magnitude vector


def dora_saves(a: AdapterSaves) -> tuple[dict[str, int], bool]:
    out, keep_input = lora_saves(a)
    if a.fused:
        # fused_dora.DoraBranch: z + s B A u (all the magnitude's gradient needs), and the d_out vectors
        # d = m / n - 1 and n in the magnitude's dtype (fp32)
        out["DoRA base and LoRA results"] = a.tokens * a.d_out * a.act_bytes + 2 * a.d_out * 4
        return out, keep_input
    # the magnitude's gradient needs the base and the LoRA result; the (detached) weight norm and the
    # scale are d_out vectors
    out["DoRA base and LoRA results"] = (2 * a.tokens * a.d_out + 3 * a.d_out) * a.act_bytes
    return out, keep_input


def identity_matrix(d_in: int, element_bytes: int) -> tuple[int, str]:
    return d_in ** 2 * element_bytes, f"d_in^2 x {element_bytes} B for the widest adapted input (d_in = {d_in:,})"


IDENTITY = Workspace(
    key="dora_identity", label="DoRA identity matrix (forward)", assumes="PEFT DoRA",
    why="PEFT computes B A by running an identity matrix through the adapter, one module at a time.",
    size=identity_matrix,
)

METHOD = Method(
    name="dora",
    when="LoRA quality is not enough at low rank: learns magnitude and direction separately",
    key_options="r, alpha, dropout, target_modules",
    options=LORA_OPTIONS,
    prepare=prepare_dora,
    adapter=AdapterBill(formula="r x (d_in + d_out) + d_out (magnitude)", tensors=dora_tensors, saves=dora_saves,
                        qv_note=True, workspace=IDENTITY),
    fused_lora=True,
    warm_imports=("peft",),
)
