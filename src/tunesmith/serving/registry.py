"""What the server serves, by name: each task adapter of the run, other runs' adapters, the base, and `auto`.

The names and the stacks come from routing.py (the same Routes `eval --adapter` and `chat --adapter` use), so
`model: "task1"` is `--adapter task1` and `model: "auto"` routes by the task prefix exactly as
`eval --adapter auto` does. `--adapter NAME=RUN` adds another run's adapter trained on the same base.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..data.prefixes import task_prefixes
from ..errors import TunesmithError
from ..inference import LoadedModel
from ..methods.adapter_stack import DEFAULT, read_stack_file
from ..routing import Route, Router, task_routes
from ..rundir import is_adapter_run, load_run_config
from .adapters import BASE
from .protocol import ApiError

AUTO = "auto"
NAME = re.compile(r"^[A-Za-z0-9_-]+$")
RESERVED = {AUTO, DEFAULT, BASE}


@dataclass(frozen=True)
class ServedModel:
    name: str
    stack: tuple[str, ...]  # PEFT adapter names that serve it; () is the base model
    route: Route | None  # its task (for the task prefix); None: no prefix is added
    system_prompt: str | None  # the run's data.system_prompt: added when a request has no system message


def parse_adapter_specs(specs: list[str]) -> dict[str, Path]:
    """`--adapter NAME=RUN` options as {name: run folder}, checked without loading anything."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, run = spec.partition("=")
        if not sep or not name or not run:
            raise TunesmithError(f"--adapter {spec}: write NAME=RUN, e.g. --adapter support=runs/support")
        if not NAME.match(name) or name in RESERVED:
            raise TunesmithError(f"--adapter {spec}: the name '{name}' must be letters, digits, '-' or '_' and not "
                                 f"one of {', '.join(sorted(RESERVED))}")
        if name in out:
            raise TunesmithError(f"--adapter {spec}: the name '{name}' is given twice; give each adapter its own name")
        if not is_adapter_run(run):
            raise TunesmithError(f"--adapter {spec}: '{run}' is not a finished adapter run (no adapter_config.json); "
                                 "train it with an adapter method, or serve a full-model run on its own")
        if read_stack_file(run) is not None:
            raise TunesmithError(f"--adapter {spec}: '{run}' is a continual run with several adapters; serve it as "
                                 "the main RUN (its task adapters are served by name)")
        out[name] = Path(run)
    return out


def base_name(ref: str) -> str:
    """The base model's served name: a model folder by its folder name, anything else as written."""
    path = Path(ref)
    return path.name if path.is_dir() else ref


def check_same_base(base_ref: str, extras: dict[str, Path]) -> None:
    for name, run in extras.items():
        other = load_run_config(run).model
        if other != base_ref and not (Path(other).is_dir() and Path(base_ref).is_dir()
                                      and Path(other).resolve() == Path(base_ref).resolve()):
            raise TunesmithError(f"--adapter {name}={run}: that run was trained on '{other}', the served model is "
                                 f"'{base_ref}'; adapters only apply to the base they were trained on")


def load_extra_adapters(loaded: LoadedModel, extras: dict[str, Path]) -> None:
    """Load each extra run's adapter into the served model, beside the run's own (a plain base becomes a PeftModel)."""
    if not extras:
        return
    from peft import PeftModel  # heavy: only serving extra adapters needs peft here

    for name, run in extras.items():
        try:
            if isinstance(loaded.model, PeftModel):
                loaded.model.load_adapter(str(run), adapter_name=name, is_trainable=False)
            else:
                loaded.model = PeftModel.from_pretrained(loaded.model, str(run), adapter_name=name)
        except (ValueError, KeyError, RuntimeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise TunesmithError(f"--adapter {name}={run}: PEFT cannot load this adapter beside the served model's "
                                 f"({first}); serve it on its own") from None
    loaded.model.eval()


class Registry:
    """Names to served models: what /v1/models lists and what a request's `model` field picks."""

    def __init__(self, models: list[ServedModel], as_loaded: ServedModel):
        self.models = {m.name: m for m in models}
        self.as_loaded = as_loaded
        routes = [m.route for m in models if m.route is not None and m.stack]
        self.router = Router(routes, auto=True) if routes else None
        self.by_route = {m.route.name: m for m in models if m.route is not None and m.stack}

    def ids(self) -> list[str]:
        return [*self.models, *([AUTO] if self.router else [])]

    def pick(self, model: str, text: str) -> tuple[ServedModel, bool]:
        """(what serves `model`, whether to put its task prefix on the first user message) for a request."""
        if model == AUTO and self.router is not None:
            route = self.router.choose(text, None)
            return (self.by_route[route.name], False) if route else (self.as_loaded, False)
        if model in self.models:
            return self.models[model], True
        raise ApiError(404, f"model '{model}' does not exist; this server serves {', '.join(self.ids())}",
                       param="model", code="model_not_found")


def build_registry(loaded: LoadedModel, target: str, extras: dict[str, Path]) -> Registry:
    """The registry for a loaded run (or plain model) plus extra adapters, which it loads into the model."""
    config = loaded.config
    system = config.data.system_prompt if config else None
    routes = task_routes(loaded)
    as_loaded = tuple(loaded.model.base_model.active_adapters) if routes else ()
    models = [ServedModel(r.name, tuple(r.stack), r, system) for r in routes]
    load_extra_adapters(loaded, extras)
    for name, run in extras.items():
        extra_config = load_run_config(run)
        route = Route(name, [name], task_prefixes(extra_config), str(run.resolve()))
        models.append(ServedModel(name, (name,), route, extra_config.data.system_prompt))
    base = base_name(config.model if config else target)
    models.append(ServedModel(base, (), None, None))
    names = [m.name for m in models]
    taken = sorted({n for n in names if names.count(n) > 1 or n in RESERVED})
    if taken:
        raise TunesmithError(f"served model names collide: {', '.join(taken)}; pick other --adapter names")
    return Registry(models, ServedModel(AUTO, as_loaded, None, system))
