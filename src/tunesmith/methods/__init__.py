"""Fine-tuning methods: each prepares the model and returns it with its optimizer parameter groups."""
from __future__ import annotations

from ..config import RunConfig
from ..errors import TunesmithError
from .lora import prepare_lora

PREPARERS = {"lora": prepare_lora}


def prepare_model(model, config: RunConfig):
    try:
        preparer = PREPARERS[config.method.name]
    except KeyError:
        raise TunesmithError(f"method.name = '{config.method.name}' is unknown; use one of {', '.join(PREPARERS)}") from None
    return preparer(model, config)
