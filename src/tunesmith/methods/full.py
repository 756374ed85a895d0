"""Full fine-tuning, partial (freeze) fine-tuning, and GaLore: the run folder holds a whole model."""
from __future__ import annotations

from ..config import RunConfig
from ..errors import TunesmithError
from .base import PreparedModel, save_full_model, trainable


def prepare_full(model, config: RunConfig) -> PreparedModel:
    for p in model.parameters():
        p.requires_grad_(True)
    return PreparedModel(model, [{"params": trainable(model), "lr_scale": 1.0}], save_full_model(model), is_adapter=False)


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


def prepare_freeze(model, config: RunConfig) -> PreparedModel:
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
        k = m.trainable_layers or 2
        path, layers = decoder_layers(model)
        if k > len(layers):
            raise TunesmithError(f"method.trainable_layers = {k} but the model has {len(layers)} layers")
        for layer in list(layers)[-k:]:
            for p in layer.parameters():
                p.requires_grad_(True)
    return PreparedModel(model, [{"params": trainable(model), "lr_scale": 1.0}], save_full_model(model), is_adapter=False)


GALORE_DEFAULT_TARGETS = [r".*self_attn.*", r".*mlp.*"]


def prepare_galore(model, config: RunConfig) -> PreparedModel:
    """Full-parameter training whose Adam moments live in a rank-r projection of each targeted matrix."""
    try:
        import galore_torch  # noqa: F401
    except ImportError as exc:
        raise TunesmithError("method.name=galore needs galore-torch: pip install galore-torch") from exc
    m = config.method
    for p in model.parameters():
        p.requires_grad_(True)
    targets = GALORE_DEFAULT_TARGETS if m.target_modules == "all-linear" else list(m.target_modules)
    args = {
        "optim": m.galore_optim,
        "optim_target_modules": targets,
        "optim_args": f"rank={m.galore_rank}, update_proj_gap={m.update_proj_gap}, scale={m.galore_scale}",
    }
    return PreparedModel(model, [], save_full_model(model), training_args=args, is_adapter=False)
