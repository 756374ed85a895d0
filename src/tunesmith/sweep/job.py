"""One run of a sweep: train it, score it, read back its numbers. Runs in the sweep's process, or in a worker
process of `--parallel` (so a job holds only plain, picklable values and loads its config itself)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from ..config import load_config
from ..evaluation.forgetting import forgetting_report
from ..evaluation.run import evaluate
from ..training.run import train
from .metrics import read_metrics


@dataclass(frozen=True)
class Job:
    source: Union[str, dict]  # the recipe file, or a config dict (the Python API)
    overrides: tuple[str, ...]  # --set options, then the grid values, then output_dir
    values: dict[str, Any]  # the grid values, as sweep.jsonl records them
    run: str  # the run folder, relative to the sweep folder
    run_dir: Path
    scored: bool  # run `eval` after training (the recipe has eval data)
    forgetting: bool  # run `eval --forgetting` instead (it scores the task too)
    progress: bool = True
    recipe: Optional[str] = field(default=None)  # the recipe file, an input the run folder must keep clear of


def run_job(job: Job) -> dict:
    """Train the run into its folder (a half-written one from a killed sweep is replaced), score it, and return
    its sweep.jsonl line."""
    config = load_config(job.source, list(job.overrides))
    train(config, overwrite=True, progress=job.progress, recipe=job.recipe)
    if job.forgetting:
        forgetting_report(str(job.run_dir), progress=job.progress)
    elif job.scored:
        evaluate(str(job.run_dir), progress=job.progress)
    return {"run": job.run, "values": job.values, "metrics": read_metrics(job.run_dir, job.forgetting)}
