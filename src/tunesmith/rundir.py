"""The layout of a run folder, and reading one back."""
from __future__ import annotations

import json
import logging
import re
import struct
import zipfile
from pathlib import Path

from .config import RunConfig, config_to_yaml, load_config
from .errors import TunesmithError
from .outdir import Input, inputs, model_input

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
DATA_STATS_FILE = "data_stats.json"
ADAPTER_CONFIG = "adapter_config.json"


MODEL_CONFIG = "config.json"


def is_run_dir(path: str | Path) -> bool:
    """A finished run: its config, plus an adapter or (full, freeze, galore) a whole model."""
    p = Path(path)
    return (p / CONFIG_FILE).is_file() and ((p / ADAPTER_CONFIG).is_file() or (p / MODEL_CONFIG).is_file())


def is_adapter_run(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def load_run_config(path: str | Path) -> RunConfig:
    p = Path(path)
    if not (p / CONFIG_FILE).is_file():
        raise TunesmithError(f"'{path}' is not a tunesmith run folder (no {CONFIG_FILE}); train one with `tunesmith train`")
    return load_config(p / CONFIG_FILE)


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def write_config(path: Path, config: RunConfig) -> None:
    """Written to a temporary name and renamed: a killed run never leaves a torn config for --resume to compare."""
    tmp = path / (CONFIG_FILE + ".tmp")
    tmp.write_text(config_to_yaml(config), encoding="utf-8")
    tmp.replace(path / CONFIG_FILE)


TRAINER_STATE = "trainer_state.json"
# Keys a resumed run may change without --force: they extend the run or say how often to log and save, or
# configure `tunesmith eval` (eval.*), and none changes what the steps already taken computed.
RESUMABLE_CHANGES = ("output_dir", "train.max_steps", "train.epochs", "train.save_steps", "train.logging_steps",
                     "train.num_threads", "eval.")


def checkpoints(path: str | Path) -> list[Path]:
    """The checkpoint-N folders in a run folder, oldest step first (the hidden partial ones are not among them)."""
    p = Path(path)
    if not p.is_dir():
        return []
    found = [c for c in p.iterdir() if c.is_dir() and re.fullmatch(r"checkpoint-\d+", c.name)]
    return sorted(found, key=lambda c: int(c.name.split("-")[1]))


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why `ckpt` cannot be resumed from (a missing or torn file), or None when every file is whole.

    Checkpoints are renamed into place only when complete (training/trainer.py), so this finds a folder that
    an older version or another tool left half-written, or a file cut short by a full disk or a copy.
    """
    state = ckpt / TRAINER_STATE
    if not state.is_file():
        return f"no {TRAINER_STATE}"
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except (ValueError, OSError):
        return f"{TRAINER_STATE} is not valid JSON"
    for f in sorted(ckpt.iterdir()):
        if f.suffix == ".safetensors" and not _whole_safetensors(f):
            return f"{f.name} is truncated"
        if f.suffix in (".pt", ".pth", ".bin") and not zipfile.is_zipfile(f):
            return f"{f.name} is truncated"
    return None


def _whole_safetensors(path: Path) -> bool:
    """The header parses and the file is exactly as long as the tensors the header describes."""
    try:
        with path.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        return path.stat().st_size == 8 + n + end
    except (ValueError, KeyError, TypeError, struct.error, OSError):
        return False


def last_checkpoint(path: str | Path) -> Path | None:
    """The newest checkpoint with every file whole, with a warning for each newer one passed over."""
    for ckpt in reversed(checkpoints(path)):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            return ckpt
        logging.getLogger("tunesmith").warning(f"warning: skipping the damaged checkpoint {ckpt} ({problem})")
    return None


def resume_checkpoint(path: Path) -> Path:
    """The checkpoint --resume continues from: the last complete one in the run folder."""
    ckpt = last_checkpoint(path)
    if ckpt is None:
        raise TunesmithError(
            f"--resume: no checkpoint in '{path}' (checkpoints are folders named checkpoint-N); "
            "train without --resume to start from scratch"
        )
    return ckpt


def config_changes(run: Path, config: RunConfig) -> list[str]:
    """`key (old -> new)` for each key in which `config` differs from the run folder's config.yaml, except
    RESUMABLE_CHANGES. The stored config is read without resolving its paths, so equal recipes compare equal."""
    import yaml

    stored = run / CONFIG_FILE
    if not stored.is_file():
        return []
    raw = yaml.safe_load(stored.read_text(encoding="utf-8")) or {}
    try:
        old = load_config(raw).model_dump(mode="json")  # fills defaults of keys added since the run was written
    except Exception:  # written by another tunesmith version: compare what it holds
        old = raw
    before, after = _flat(old), _flat(config.model_dump(mode="json"))
    changed = [k for k in sorted(before.keys() | after.keys()) if before.get(k) != after.get(k)
               and not any(k == a or (a.endswith(".") and k.startswith(a)) for a in RESUMABLE_CHANGES)]
    return [f"{k} ({before.get(k)!r} -> {after.get(k)!r})" for k in changed]


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def run_inputs(config: RunConfig, recipe: str | Path | None = None) -> list[Input]:
    """Everything a training run reads from disk, which its output folder must stay clear of."""
    d, r = config.data, config.regularize
    found = inputs("recipe", recipe) + model_input(config.model, "model")
    found += inputs("data file", d.train) + inputs("eval data file", d.eval)
    if d.chat_template and "{" not in d.chat_template:
        found += inputs("chat template", d.chat_template)
    if r.replay is not None and r.replay.source != "general":
        found += inputs("replay data", r.replay.source)
    if r.ewc is not None and r.ewc.reference != "general":
        found += inputs("EWC reference data", r.ewc.reference)
    return found + inputs("continual.previous run", config.continual.previous)
