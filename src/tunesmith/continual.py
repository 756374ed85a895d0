"""Continual and multi-task learning: task prefixes, runs that build on earlier runs' adapters, routing.

Task prefixes (`data.task_prefix`): a short tag such as `[Translation]` put before the first user
message of every example of a dataset, the same way in training, eval and chat, so one model can
tell its tasks apart and `--adapter auto` can route by it.

`continual.previous: [runs/task1, ...]` builds on earlier runs (oldest first; an earlier run's own
earlier adapters come along). Every strategy trains one new LoRA adapter; they differ in what the
earlier adapters do meanwhile:

- progressive: loaded beside the new adapter, frozen and active. The new adapter starts at B = 0, so
  at its initialisation the model computes exactly what the last run did (old-task outputs unchanged).
- o-lora: the same, plus lambda * sum over layers and earlier adapters of ||A_old A_new^T||_F^2, which
  pushes the new adapter's input subspace away from the earlier ones' (Wang et al. 2023).
- merge: the earlier adapters are folded into the base weights first (plain sequential fine-tuning).
- separate: the earlier adapters are kept but switched off; the new one trains on the untouched base,
  so each task has its own independent adapter (pick one with `--adapter NAME`, or `auto`).

The run folder is self-contained: the new adapter at the top (PEFT's "default", loads with
`PeftModel.from_pretrained` on top of its stack), each earlier adapter copied into a subfolder named
after it, and `continual.json` listing them with their task prefixes and, for each task, the adapters
that serve it (its "stack": all adapters up to it, or only its own for `separate`).
"""
from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .chat import ChatSession
from .config import RunConfig
from .errors import TunesmithError


# ---- task prefixes ------------------------------------------------------------------------------


def apply_task_prefix(conv: list[dict], prefix: str | None) -> list[dict]:
    """A copy of `conv` whose first user message starts with `prefix` (unchanged if it already does)."""
    if not prefix:
        return conv
    out = [dict(m) for m in conv]
    for m in out:
        if m["role"] == "user":
            if not m["content"].startswith(prefix):
                m["content"] = f"{prefix} {m['content']}"
            break
    return out


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def train_prefixes(config: RunConfig) -> list[str | None]:
    """One prefix (or None) per data.train entry."""
    n = len(_as_list(config.data.train))
    p = config.data.task_prefix
    return list(p) if isinstance(p, list) else [p] * n


def eval_prefixes(config: RunConfig) -> list[str | None]:
    """One prefix per data.eval entry: the single prefix, or the train prefixes when eval lists one file per dataset."""
    p = config.data.task_prefix
    evals = _as_list(config.data.eval)
    if not isinstance(p, list):
        return [p] * len(evals)
    if len(evals) == len(p):
        return list(p)
    distinct = {x for x in p if x}
    if len(distinct) <= 1 and all(p):
        return [next(iter(distinct), None)] * len(evals)
    raise TunesmithError(
        f"data.task_prefix has one prefix per training dataset ({len(p)}), so data.eval must list one eval file per "
        f"training dataset in the same order (it lists {len(evals)})"
    )


def task_prefixes(config: RunConfig) -> list[str]:
    """The distinct prefixes a config trains with."""
    seen: list[str] = []
    for p in train_prefixes(config):
        if p and p not in seen:
            seen.append(p)
    return seen


def load_task_conversations(config: RunConfig, which: str) -> list[tuple[list[dict], str, int]]:
    """(conversation, where, dataset index) for data.train or data.eval, each with its dataset's task prefix."""
    from .data.dataset import load_conversations

    sources = _as_list(config.data.train if which == "train" else config.data.eval)
    prefixes = train_prefixes(config) if which == "train" else eval_prefixes(config)
    out = []
    for i, (src, prefix) in enumerate(zip(sources, prefixes)):
        out.extend((apply_task_prefix(conv, prefix), where, i) for conv, where in load_conversations(src, config))
    return out



# ---- the adapters of a task sequence --------------------------------------------------------------

CONTINUAL_FILE = "continual.json"
DEFAULT = "default"  # PEFT's name for a run's own adapter
LORA_KEYS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


@dataclass
class AdapterEntry:
    name: str  # the adapter's name in the model (its run folder's name)
    path: Path  # folder with adapter_config.json + adapter_model.safetensors
    source: str  # the run it was trained in (absolute path), for de-duplication
    task_prefixes: list[str] = field(default_factory=list)
    stack: list[str] = field(default_factory=list)  # adapters that serve its task, in order

    def as_json(self, root: Path) -> dict:
        return {"name": self.name, "path": self.path.name if self.path.parent == root else str(self.path),
                "source": self.source, "task_prefixes": self.task_prefixes, "stack": self.stack}


def adapter_name(run: str | Path, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_-]", "_", Path(run).resolve().name) or "task"
    if base == DEFAULT:
        base = "task"
    name, k = base, 2
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    return name


def run_adapters(run: str | Path) -> list[AdapterEntry]:
    """The adapters a finished run consists of, oldest first; its own adapter last (named after its folder)."""
    from .rundir import is_adapter_run, load_run_config

    run = Path(run)
    if not is_adapter_run(run):
        raise TunesmithError(
            f"continual.previous: '{run}' is not a finished adapter run (no adapter_config.json); "
            "earlier tasks must be trained with an adapter method (lora, loraplus)"
        )
    config = load_run_config(run)
    adapter_type = json.loads((run / "adapter_config.json").read_text()).get("peft_type")
    if adapter_type != "LORA":
        raise TunesmithError(f"continual.previous: '{run}' holds a {adapter_type} adapter; only LoRA adapters stack")
    entries: list[AdapterEntry] = []
    meta_file = run / CONTINUAL_FILE
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        for e in meta["adapters"]:
            path = run / e["path"] if not Path(e["path"]).is_absolute() else Path(e["path"])
            entries.append(AdapterEntry(e["name"], path, e["source"], e["task_prefixes"], e["stack"]))
        own = meta["this"]
        entries.append(AdapterEntry(own["name"], run, own["source"], own["task_prefixes"], own["stack"]))
    else:
        name = adapter_name(run, set())
        entries.append(AdapterEntry(name, run, str(run.resolve()), task_prefixes(config), [name]))
    return entries


def previous_adapters(config: RunConfig) -> list[AdapterEntry]:
    """The adapters of every earlier run, oldest first, each once, with unique names."""
    from .rundir import load_run_config

    out: list[AdapterEntry] = []
    renamed: dict[str, str] = {}
    for prev in config.continual.previous:
        prev_config = load_run_config(prev)
        if prev_config.model != config.model:
            raise TunesmithError(
                f"continual.previous: '{prev}' was trained on model '{prev_config.model}', this run uses "
                f"'{config.model}'; adapters only apply to the base they were trained on"
            )
        for e in run_adapters(prev):
            if any(o.source == e.source for o in out):
                continue
            name = adapter_name(e.name, {o.name for o in out})
            renamed[e.name] = name
            out.append(AdapterEntry(name, e.path, e.source, e.task_prefixes, [renamed.get(s, s) for s in e.stack]))
    return out


def previous_chain(config: RunConfig) -> list[str]:
    """The earlier runs of a sequence, oldest first, as paths (for the accuracy matrix)."""
    return [e.source for e in previous_adapters(config)]


def own_stack(config: RunConfig, names: list[str], own: str) -> list[str]:
    return [own] if config.continual.strategy == "separate" else [*names, own]


def _lora_params_of(model, names: set[str]):
    for n, p in model.named_parameters():
        parts = n.split(".")
        if any(parts[k] in LORA_KEYS and parts[k + 1] in names for k in range(len(parts) - 1)):
            yield n, p


def activate(model, names: list[str]) -> None:
    """Make exactly `names` the active adapters (PEFT names; the run's own is "default"), keeping grads as they were."""
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    model.base_model.set_adapter(names if len(names) > 1 else names[0])
    for n, p in model.named_parameters():
        p.requires_grad_(grads[n])


# ---- training ---------------------------------------------------------------------------------


def merge_previous_into_base(model, config: RunConfig):
    """strategy=merge: fold every earlier adapter into the base weights; other strategies: unchanged."""
    if config.continual.strategy != "merge":
        return model
    from peft import PeftModel

    stack = previous_adapters(config)
    peft_model = PeftModel.from_pretrained(model, str(stack[0].path), adapter_name=stack[0].name)
    for e in stack[1:]:
        peft_model.load_adapter(str(e.path), adapter_name=e.name)
    return peft_model.merge_and_unload(adapter_names=[e.name for e in stack])


def attach_previous(prepared, config: RunConfig) -> None:
    """Load the earlier adapters beside the new one ("default"), frozen; active for progressive and o-lora."""
    if config.continual.strategy == "merge":
        return
    model = prepared.model
    if not callable(getattr(model, "load_adapter", None)):
        raise TunesmithError("continual.previous needs an adapter method (method.name lora or loraplus)")
    stack = previous_adapters(config)
    for e in stack:
        model.load_adapter(str(e.path), adapter_name=e.name, is_trainable=False)
    names = [e.name for e in stack]
    model.base_model.set_adapter([*names, DEFAULT] if config.continual.strategy != "separate" else DEFAULT)
    for _, p in _lora_params_of(model, set(names)):
        p.requires_grad_(False)
    for n, p in _lora_params_of(model, {DEFAULT}):
        p.requires_grad_(True)


def save_previous(out: Path, config: RunConfig) -> None:
    """Copy the earlier adapters into the run folder and write continual.json."""
    out = Path(out)
    stack = previous_adapters(config)
    entries = []
    for e in stack:
        target = out / e.name
        target.mkdir(parents=True, exist_ok=True)
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy(e.path / f, target / f)
        entries.append(AdapterEntry(e.name, target, e.source, e.task_prefixes, e.stack).as_json(out))
    own = adapter_name(out, {e.name for e in stack})
    meta = {
        "strategy": config.continual.strategy,
        "adapters": entries,
        "this": {"name": own, "path": ".", "source": str(out.resolve()), "task_prefixes": task_prefixes(config),
                 "stack": own_stack(config, [e.name for e in stack], own)},
    }
    (out / CONTINUAL_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


class OrthogonalityTerm:
    """O-LoRA: lambda * sum over adapted layers and earlier adapters of ||A_old A_new^T||_F^2, once per step."""

    def __init__(self, model, lam: float):
        self.lam = float(lam)
        self.pairs: list[tuple[torch.Tensor, list[torch.Tensor]]] = []
        for module in model.modules():
            lora_a = getattr(module, "lora_A", None)
            if not isinstance(lora_a, torch.nn.ModuleDict) or DEFAULT not in lora_a:
                continue
            old = [lora_a[k].weight for k in lora_a.keys() if k != DEFAULT]
            if old:
                self.pairs.append((lora_a[DEFAULT].weight, old))
        if not self.pairs:
            raise TunesmithError("continual.strategy=o-lora: no layer has both an earlier and the new adapter; "
                                 "use the same method.target_modules as the earlier runs")

    def penalty(self) -> torch.Tensor:
        total = None
        for new, olds in self.pairs:
            for old in olds:
                part = (old.detach().float() @ new.float().T).pow(2).sum()
                total = part if total is None else total + part
        return self.lam * total

    def __call__(self, model, inputs: dict, hidden) -> torch.Tensor:
        from .regularize.distill import micro_batch_share

        return self.penalty() * micro_batch_share(inputs)


# ---- inference: load a continual run, route by task -----------------------------------------------


def load_previous_adapters(model, run: Path) -> None:
    """After PeftModel.from_pretrained(base, run): add the run's earlier adapters and activate as it trained."""
    meta_file = Path(run) / CONTINUAL_FILE
    if not meta_file.is_file():
        return
    meta = json.loads(meta_file.read_text())
    for e in meta["adapters"]:
        model.load_adapter(str(Path(run) / e["path"]), adapter_name=e["name"], is_trainable=False)
    model.eval()
    stack = [DEFAULT if n == meta["this"]["name"] else n for n in meta["this"]["stack"]]
    activate(model, stack)


@dataclass
class Route:
    name: str  # the task's adapter name (its run folder's name)
    stack: list[str]  # PEFT adapter names to activate for it
    prefixes: list[str]
    source: str


def task_routes(loaded) -> list[Route]:
    """Every task a loaded run can serve: its earlier tasks' adapters (continual runs) and its own."""
    run = Path(loaded.label)
    meta_file = run / CONTINUAL_FILE
    if not callable(getattr(loaded.model, "load_adapter", None)) or not (run / "adapter_config.json").is_file():
        return []
    if not meta_file.is_file():
        config = loaded.config
        return [Route(adapter_name(run, set()), [DEFAULT], task_prefixes(config) if config else [], str(run.resolve()))]
    meta = json.loads(meta_file.read_text())
    own = meta["this"]["name"]
    fix = lambda names: [DEFAULT if n == own else n for n in names]  # noqa: E731
    return [Route(e["name"], fix(e["stack"]), e["task_prefixes"], e["source"]) for e in [*meta["adapters"], meta["this"]]]


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


@contextlib.contextmanager
def using_adapters(loaded, stack: list[str]):
    """Temporarily serve with exactly the adapters in `stack`."""
    model = loaded.model
    before = list(model.base_model.active_adapters)
    activate(model, stack)
    try:
        yield
    finally:
        activate(model, before)


def adapters_for_task(loaded, task_run: str | Path):
    """Serve the task trained in `task_run` with the adapters it was trained with, when this model has them."""
    source = str(Path(task_run).resolve())
    for r in task_routes(loaded):
        if r.source == source:
            return using_adapters(loaded, r.stack)
    return contextlib.nullcontext()


def evaluate_routed(loaded, config: RunConfig, adapter: str, limit: int | None = None, progress: bool = True) -> dict:
    """evaluate_loaded with `--adapter NAME` (one task's adapters for every example) or `auto` (by task prefix)."""
    from .evaluation.run import eval_conversations, evaluate_loaded

    routes = task_routes(loaded)
    if adapter != "auto":
        route = find_route(routes, adapter)
        with using_adapters(loaded, route.stack):
            report = evaluate_loaded(loaded, config, limit, progress)
        return {**report, "adapter": route.name}
    if not routes:
        raise TunesmithError("--adapter auto: this model has no named adapters to route to (train with continual.previous)")
    convs = eval_conversations(config)
    convs = convs[: limit or config.eval.limit or len(convs)]
    groups: dict[str, list] = {}
    for conv in convs:
        route = route_for_text(routes, first_user_text(conv[0]))
        groups.setdefault(route.name if route else "", []).append(conv)
    parts = []
    for name, group in groups.items():
        ctx = using_adapters(loaded, find_route(routes, name).stack) if name else contextlib.nullcontext()
        with ctx:
            parts.append((group, evaluate_loaded(loaded, config, None, progress, convs=group)))
    n = sum(len(g) for g, _ in parts)
    tokens = sum(r["eval_tokens"] for _, r in parts)
    loss = sum(r["eval_loss"] * r["eval_tokens"] for _, r in parts) / tokens if tokens else float("nan")
    return {
        "model": loaded.label,
        "examples": n,
        "scorer": config.eval.scorer,
        "score": round(sum(r["score"] * len(g) for g, r in parts) / n, 4),
        "eval_loss": round(loss, 5),
        "perplexity": round(math.exp(loss), 4) if tokens else float("nan"),
        "eval_tokens": tokens,
        "adapter": "auto",
        "routing": {name or "(no prefix: all adapters)": len(g) for name, (g, _) in zip(groups, parts)},
        "seconds": round(sum(r["seconds"] for _, r in parts), 1),
        "samples": [s for _, r in parts for s in r["samples"]][:5],
    }


def make_chat_session(loaded, adapter: str | None = None, **kwargs):
    """A ChatSession that puts the task prefix on the first user message and serves with the task's adapters."""
    routes = task_routes(loaded)
    config = loaded.config
    if not routes and config is not None and len(task_prefixes(config)) == 1:
        routes = [Route("task", [], task_prefixes(config), "")]  # the base model of a recipe with one prefix
    if adapter is None and not any(r.prefixes for r in routes):
        return ChatSession(loaded, **kwargs)
    fixed = find_route(routes, adapter) if adapter not in (None, "auto") else None
    if adapter == "auto" and not routes:
        raise TunesmithError("--adapter auto: this model has no named adapters to route to (train with continual.previous)")
    return TaskChatSession(loaded, routes, fixed, auto=adapter == "auto", **kwargs)


class TaskChatSession(ChatSession):
    """Routes each turn: a fixed task (--adapter NAME), by the message's task prefix (auto), or the run's own task."""

    def __init__(self, loaded, routes: list[Route], fixed: Route | None, auto: bool = False, **kwargs):
        super().__init__(loaded, **kwargs)
        self.routes, self.fixed, self.auto, self.current = routes, fixed, auto, None

    def _route_turn(self, text: str) -> str:
        route = self.fixed
        if self.auto:
            route = route_for_text(self.routes, text) or self.current
        elif route is None:
            own = self.routes[-1] if self.routes else None
            route = own if own and len(own.prefixes) == 1 else None
        if route is not None and not self.history and len(route.prefixes) == 1 and not text.startswith(route.prefixes[0]):
            text = f"{route.prefixes[0]} {text}"  # as in training: the prefix starts the first user message
        if route is not None and route.stack and route is not self.current:
            activate(self.loaded.model, route.stack)
        self.current = route
        return text

    def stream(self, user_text: str):
        return super().stream(self._route_turn(user_text))
