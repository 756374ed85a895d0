"""The layout of a run folder, and reading one back."""
from __future__ import annotations

import json
import re
from pathlib import Path

from .config import RunConfig, config_to_yaml, load_config
from .errors import TunesmithError

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


def check_output_dir(path: Path, overwrite: bool, resume: bool) -> Path | None:
    """Refuse to clobber earlier work; return the checkpoint to resume from, if asked."""
    if resume:
        ckpt = last_checkpoint(path)
        if ckpt is None:
            raise TunesmithError(
                f"--resume: no checkpoint in '{path}' (checkpoints are folders named checkpoint-N); "
                "train without --resume to start from scratch"
            )
        return ckpt
    resolved = path.resolve()
    if overwrite and (resolved == Path.cwd().resolve() or resolved in Path.cwd().resolve().parents or resolved == Path.home()):
        raise TunesmithError(f"output_dir '{path}' is the working directory, one of its parents or your home; "
                             "--overwrite would delete it. Choose a dedicated folder such as runs/my-run")
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise TunesmithError(
            f"output_dir '{path}' already exists and is not empty; pass --overwrite to replace it, "
            "--resume to continue it, or --output-dir to write elsewhere"
        )
    return None
