"""The layout of a run folder, and reading one back."""
from __future__ import annotations

import json
import re
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
    (path / CONFIG_FILE).write_text(config_to_yaml(config), encoding="utf-8")


def last_checkpoint(path: str | Path) -> Path | None:
    p = Path(path)
    if not p.is_dir():
        return None
    ckpts = [c for c in p.iterdir() if c.is_dir() and re.fullmatch(r"checkpoint-\d+", c.name)]
    complete = [c for c in ckpts if (c / "trainer_state.json").is_file()]
    return max(complete, key=lambda c: int(c.name.split("-")[1]), default=None)


def resume_checkpoint(path: Path) -> Path:
    """The checkpoint --resume continues from: the last complete one in the run folder."""
    ckpt = last_checkpoint(path)
    if ckpt is None:
        raise TunesmithError(
            f"--resume: no checkpoint in '{path}' (checkpoints are folders named checkpoint-N); "
            "train without --resume to start from scratch"
        )
    return ckpt


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
