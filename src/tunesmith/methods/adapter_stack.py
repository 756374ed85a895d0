"""Adapter stacks: runs that build on earlier runs' LoRA adapters (`continual.previous`).

`continual.previous: [runs/task1, ...]` builds on earlier runs (oldest first; an earlier run's own
earlier adapters come along). Every strategy trains one new LoRA adapter; they differ in what the
earlier adapters do meanwhile:

- progressive: loaded beside the new adapter, frozen and active. The new adapter starts at B = 0, so
  at its initialisation the model computes exactly what the last run did (old-task outputs unchanged).
- o-lora: the same, plus an orthogonality loss term (regularize/orthogonality.py).
- merge: the earlier adapters are folded into the base weights first (plain sequential fine-tuning).
- separate: the earlier adapters are kept but switched off; the new one trains on the untouched base,
  so each task has its own independent adapter (pick one with `--adapter NAME`, or `auto`).

The run folder is self-contained: the new adapter at the top (PEFT's "default", loads with
`PeftModel.from_pretrained` on top of its stack), each earlier adapter copied into a subfolder named
after it, and `continual.json` listing them with their task prefixes and, for each task, the adapters
that serve it (its "stack": all adapters up to it, or only its own for `separate`). Serving one task
of such a run by name or by prefix is routing.py's job.
"""
from __future__ import annotations

import contextlib
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..config import RunConfig
from ..data.prefixes import task_prefixes
from ..errors import TunesmithError
from ..rundir import is_adapter_run, load_run_config

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
    """A PEFT adapter name from a run folder's name, unique among `taken` and never PEFT's "default"."""
    base = re.sub(r"[^A-Za-z0-9_-]", "_", Path(run).resolve().name) or "task"
    if base == DEFAULT:
        base = "task"
    name, k = base, 2
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    return name


def read_stack_file(run: str | Path) -> dict | None:
    """The run's continual.json (None for a run that built on no earlier run)."""
    meta_file = Path(run) / CONTINUAL_FILE
    return json.loads(meta_file.read_text()) if meta_file.is_file() else None


def peft_names(names: list[str], own: str) -> list[str]:
    """Adapter names as the loaded model knows them: the run's own adapter is PEFT's "default"."""
    return [DEFAULT if n == own else n for n in names]


def run_adapters(run: str | Path) -> list[AdapterEntry]:
    """The adapters a finished run consists of, oldest first; its own adapter last (named after its folder)."""
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
    meta = read_stack_file(run)
    if meta is None:
        name = adapter_name(run, set())
        return [AdapterEntry(name, run, str(run.resolve()), task_prefixes(config), [name])]
    entries = []
    for e in meta["adapters"]:
        path = run / e["path"] if not Path(e["path"]).is_absolute() else Path(e["path"])
        entries.append(AdapterEntry(e["name"], path, e["source"], e["task_prefixes"], e["stack"]))
    own = meta["this"]
    entries.append(AdapterEntry(own["name"], run, own["source"], own["task_prefixes"], own["stack"]))
    return entries


def previous_adapters(config: RunConfig) -> list[AdapterEntry]:
    """The adapters of every earlier run, oldest first, each once, with unique names."""
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
    """The adapters that serve this run's own task: all of them, or only its own for `separate`."""
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


@contextlib.contextmanager
def using_adapters(model, names: list[str]):
    """Temporarily run `model` with exactly the adapters `names` active."""
    before = list(model.base_model.active_adapters)
    activate(model, names)
    try:
        yield
    finally:
        activate(model, before)


# ---- training ---------------------------------------------------------------------------------


def merge_previous_into_base(model, config: RunConfig):
    """strategy=merge: fold every earlier adapter into the base weights; other strategies: unchanged."""
    if config.continual.strategy != "merge":
        return model
    from peft import PeftModel  # heavy: only a merge-strategy run needs it here

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


# ---- inference ----------------------------------------------------------------------------------


def load_previous_adapters(model, run: Path) -> None:
    """After PeftModel.from_pretrained(base, run): add the run's earlier adapters and activate as it trained."""
    meta = read_stack_file(run)
    if meta is None:
        return
    for e in meta["adapters"]:
        model.load_adapter(str(Path(run) / e["path"]), adapter_name=e["name"], is_trainable=False)
    model.eval()
    activate(model, peft_names(meta["this"]["stack"], meta["this"]["name"]))
