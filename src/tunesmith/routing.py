"""Serving one task of a multi-task model: pick its adapters by name (`--adapter NAME`) or by task prefix (`auto`).

A run trained with `data.task_prefix` and/or `continual.previous` serves several tasks; each is a Route:
its name, the adapters that serve it (its stack, from continual.json) and its task prefixes. `eval`,
`chat` and the server all route through this module, so a message or example reaches the same adapters
whichever command serves it.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from .data.prefixes import task_prefixes
from .errors import TunesmithError
from .methods.adapter_stack import DEFAULT, activate, adapter_name, peft_names, read_stack_file, using_adapters

NO_ROUTES = "--adapter auto: this model has no named adapters to route to (train with continual.previous)"


@dataclass
class Route:
    name: str  # the task's adapter name (its run folder's name)
    stack: list[str]  # PEFT adapter names to activate for it
    prefixes: list[str]
    source: str

    def prefixed(self, text: str) -> str:
        """`text` starting with this task's prefix, as in training (unchanged unless the task has exactly one)."""
        if len(self.prefixes) != 1 or text.startswith(self.prefixes[0]):
            return text
        return f"{self.prefixes[0]} {text}"


def task_routes(loaded) -> list[Route]:
    """Every task a loaded run can serve: its earlier tasks' adapters (continual runs) and its own."""
    run = Path(loaded.label)
    if not callable(getattr(loaded.model, "load_adapter", None)) or not (run / "adapter_config.json").is_file():
        return []
    meta = read_stack_file(run)
    if meta is None:
        config = loaded.config
        return [Route(adapter_name(run, set()), [DEFAULT], task_prefixes(config) if config else [], str(run.resolve()))]
    own = meta["this"]["name"]
    return [Route(e["name"], peft_names(e["stack"], own), e["task_prefixes"], e["source"])
            for e in [*meta["adapters"], meta["this"]]]


def find_route(routes: list[Route], name: str) -> Route:
    for r in routes:
        if r.name == name:
            return r
    if not routes:
        raise TunesmithError(f"--adapter {name}: this model has no named adapters (train with continual.previous)")
    raise TunesmithError(f"--adapter {name}: unknown adapter; this run has {', '.join(r.name for r in routes)} (or auto)")


def route_for_text(routes: list[Route], text: str) -> Route | None:
    """The route whose task prefix starts `text` (the longest one when several do)."""
    best, length = None, -1
    for r in routes:
        for p in r.prefixes:
            if text.startswith(p) and len(p) > length:
                best, length = r, len(p)
    return best


def first_user_text(conv: list[dict]) -> str:
    return next((m["content"] for m in conv if m["role"] == "user"), "")


def group_by_route(routes: list[Route], convs: list) -> dict[str, list]:
    """(conversation, where) pairs grouped by the route their first user message's prefix picks ("": none does)."""
    groups: dict[str, list] = {}
    for conv in convs:
        route = route_for_text(routes, first_user_text(conv[0]))
        groups.setdefault(route.name if route else "", []).append(conv)
    return groups


def serving(loaded, route: Route | None):
    """A context that serves `route`'s adapters (None: the model as loaded, all its adapters)."""
    return using_adapters(loaded.model, route.stack) if route is not None else contextlib.nullcontext()


def adapters_for_task(loaded, task_run: str | Path):
    """Serve the task trained in `task_run` with the adapters it was trained with, when this model has them."""
    source = str(Path(task_run).resolve())
    return serving(loaded, next((r for r in task_routes(loaded) if r.source == source), None))


@dataclass
class Router:
    """Picks each message's task: a fixed one (--adapter NAME), by its task prefix (auto), or the run's own."""

    routes: list[Route]
    fixed: Route | None = None
    auto: bool = False

    def choose(self, text: str, current: Route | None) -> Route | None:
        """The route for a message; `current` (the previous message's) when auto finds no prefix."""
        if self.auto:
            return route_for_text(self.routes, text) or current
        if self.fixed is not None:
            return self.fixed
        own = self.routes[-1] if self.routes else None
        return own if own and len(own.prefixes) == 1 else None


def router_for(loaded, adapter: str | None) -> Router | None:
    """The Router for `--adapter` (NAME, auto or None); None when nothing needs routing (no adapter, no prefix)."""
    routes = task_routes(loaded)
    config = loaded.config
    if not routes and config is not None and len(task_prefixes(config)) == 1:
        routes = [Route("task", [], task_prefixes(config), "")]  # the base model of a recipe with one prefix
    if adapter is None and not any(r.prefixes for r in routes):
        return None
    if adapter == "auto" and not routes:
        raise TunesmithError(NO_ROUTES)
    return Router(routes, find_route(routes, adapter) if adapter not in (None, "auto") else None, adapter == "auto")


def switch(model, route: Route | None, current: Route | None) -> None:
    """Activate `route`'s adapters unless `current` already serves (a route without a stack keeps the model as is)."""
    if route is not None and route.stack and route is not current:
        activate(model, route.stack)
