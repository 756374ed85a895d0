"""Where tunesmith keeps its caches."""
from __future__ import annotations

import os
from pathlib import Path


def tunesmith_home() -> Path:
    """`TUNESMITH_HOME`, or `~/.cache/tunesmith`."""
    env = os.environ.get("TUNESMITH_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tunesmith"


def models_dir() -> Path:
    return tunesmith_home() / "models"
