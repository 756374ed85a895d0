"""Partial fine-tuning: only the last K decoder layers, or the parameters named by substrings, train.

The run folder holds a whole model (the frozen parameters unchanged, bit for bit).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import TunesmithError
from .base import PreparedModel, save_full_model, trainable
from .method import Method

if TYPE_CHECKING:
    from ..config import RunConfig

DEFAULT_LAYERS = 2


def decoder_layers(model):
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        obj = model
        try:
            for attr in path.split("."):
                obj = getattr(obj, attr)
            return path, obj
        except AttributeError:
            continue
    raise TunesmithError("method.trainable_layers: cannot find the model's transformer layers; use method.trainable_modules")


def prepare_freeze(model, config: RunConfig, total_steps: int = 0) -> PreparedModel:
    m = config.method
    for p in model.parameters():
        p.requires_grad_(False)
    if m.trainable_modules:
        names = [n for n, _ in model.named_parameters() if any(key in n for key in m.trainable_modules)]
        if not names:
            raise TunesmithError(
                f"method.trainable_modules = {m.trainable_modules} matches no parameter; names look like "
                f"{next(iter(dict(model.named_parameters())))}"
            )
        params = dict(model.named_parameters())
        for n in names:
            params[n].requires_grad_(True)
    else:
        k = m.trainable_layers or DEFAULT_LAYERS
        path, layers = decoder_layers(model)
        if k > len(layers):
            raise TunesmithError(f"method.trainable_layers = {k} but the model has {len(layers)} layers")
        for layer in list(layers)[-k:]:
            for p in layer.parameters():
                p.requires_grad_(True)
    return PreparedModel(model, [{"params": trainable(model), "lr_scale": 1.0}], save_full_model(model))


def chosen_parameters(names: list[str], layers: int, m) -> tuple[set[str], str]:
    """The bill's view of prepare_freeze: the parameter names that train, from names alone (no weights)."""
    if m.trainable_modules:
        chosen = {n for n in names if any(key in n for key in m.trainable_modules)}
        if not chosen:
            raise TunesmithError(
                f"method.trainable_modules = {m.trainable_modules} matches no parameter; names look like {names[1]}"
            )
        return chosen, f"parameters whose name contains {', '.join(m.trainable_modules)}"
    k = m.trainable_layers or DEFAULT_LAYERS
    if k > layers:
        raise TunesmithError(f"method.trainable_layers = {k} but the model has {layers} layers")
    prefixes = tuple(f"model.layers.{i}." for i in range(layers - k, layers))
    return {n for n in names if n.startswith(prefixes)}, f"the last {k} of {layers} layers"


def check_one_choice(m) -> None:
    if m.trainable_layers and m.trainable_modules:
        raise ValueError("method.trainable_layers and method.trainable_modules: set one of them, not both")


METHOD = Method(
    name="freeze",
    when="cheap partial tuning: only the last K layers or named modules train",
    key_options="trainable_layers or trainable_modules",
    options=("trainable_layers", "trainable_modules"),
    prepare=prepare_freeze,
    check=check_one_choice,
    rank_option=None,
    trainable_base=chosen_parameters,
)
