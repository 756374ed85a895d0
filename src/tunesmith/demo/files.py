"""Write a generated task as train and held-out JSONL files."""
from __future__ import annotations

import json
from pathlib import Path


def write_task(out_dir: str | Path, name: str, train: list[dict], held_out: list[dict]) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = out / f"{name}-train.jsonl", out / f"{name}-eval.jsonl"
    for path, rows in zip(paths, (train, held_out)):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return paths
