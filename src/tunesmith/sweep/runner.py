"""`tunesmith.sweep(recipe, grid)`: every combination of the grid as its own run folder under one sweep folder.

`plan_sweep` checks everything first and touches nothing: the grid, every combination's config (each validated
like `train --set` would), the metric, and the sweep folder (never an input, nor inside or around one). Then
`run_sweep` trains the runs not finished yet, one at a time or `parallel` at once, and after each one adds its
line to sweep.jsonl and rewrites sweep.md (and pareto.html with `forgetting`). A run is finished when its
summary.json is complete and its line is in sweep.jsonl (with the numbers this sweep needs); anything else found
in its folder is trained again from scratch, never reused. Rerunning a killed sweep therefore continues it.
"""
from __future__ import annotations

import shutil
from concurrent.futures import Executor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Union

import torch

from ..config import RunConfig, load_config
from ..errors import TunesmithError
from ..outdir import Input, check_target, inputs
from ..rundir import run_inputs
from ..yamlfile import field_paths
from .grid import Combination, Grid, canonical, check_keys, expand, as_overrides, parse_grid, run_name
from .job import Job, run_job as train_and_score
from .metrics import Metric, Requirement, best_row, default_metric, get_metric, parse_requirement, summary_complete
from .pareto import pareto_page
from .parallel import finished_in_any_order, process_pool
from .results import (
    MANIFEST_FILE, PARETO_FILE, RUNS_DIR, TABLE_FILE, read_manifest, read_rows, record_row, write_manifest,
    write_text_atomic,
)
from .table import sweep_markdown

Source = Union[str, Path, dict]
FORGETTING_METRICS = ("general_change", "general_perplexity")


@dataclass
class SweepPlan:
    source: Source
    out: Path
    grid: Grid
    jobs: list[Job]  # one per combination, in grid order
    metric: Metric
    scored: bool
    forgetting: bool
    parallel: int = 1
    config: dict = field(default_factory=dict)  # the recipe with its --set options, as the manifest keeps it
    requirements: tuple[Requirement, ...] = ()  # what the best run must keep (--require)

    def finished(self) -> dict[str, dict]:
        """canonical(values) -> line, for each combination whose run is finished."""
        wanted = {canonical(j.values): j for j in self.jobs}
        done = {}
        for row in read_rows(self.out):
            job = wanted.get(canonical(row["values"]))
            if job is not None and self._complete(row, job):
                done[canonical(row["values"])] = row
        return done

    def pending(self) -> list[Job]:
        done = self.finished()
        return [j for j in self.jobs if canonical(j.values) not in done]

    def _complete(self, row: dict, job: Job) -> bool:
        needed = (["score"] if self.scored else []) + (["general_change"] if self.forgetting else [])
        return summary_complete(job.run_dir) and all(k in row.get("metrics", {}) for k in needed)


@dataclass
class SweepResult:
    out: Path
    rows: list[dict]  # the finished runs of this grid, in grid order
    best: Optional[dict]
    metric: Metric
    trained: int  # runs trained by this call
    requirements: tuple[Requirement, ...] = ()


def plan_sweep(recipe: Source, grid: Union[Iterable[str], Grid], *, overrides: Iterable[str] = (),
               metric: Optional[str] = None, forgetting: bool = False, out: Union[str, Path, None] = None,
               parallel: int = 1, progress: bool = True, require: Iterable[str] = ()) -> SweepPlan:
    """Check a sweep without touching anything. `grid` is `--grid` options (`KEY=V1,V2`) or a {key: values} dict;
    `out` defaults to the recipe's output_dir + `-sweep`; `require` (`METRIC>=VALUE`, `METRIC<=VALUE`) limits which
    runs may be named best, e.g. the smallest general_change among runs with score>=0.93."""
    if parallel < 1:
        raise TunesmithError(f"--parallel {parallel}: must be 1 or more (runs trained at once)")
    grid, overrides = _checked_grid(grid), list(overrides)
    base = load_config(recipe, overrides)
    scored = bool(base.data.eval) or base.data.eval_split > 0
    chosen = _checked_metric(metric, scored, forgetting)
    requirements = tuple(_checked_requirement(q, scored, forgetting) for q in require)
    folder = Path(out) if out is not None else Path(f"{base.output_dir.rstrip('/')}-sweep")
    recipe_file = str(recipe) if isinstance(recipe, (str, Path)) else None
    jobs, reads = [], inputs("recipe", recipe_file)
    for combination in expand(grid):
        name = run_name(combination)
        run_dir = folder / RUNS_DIR / name
        job_overrides = (*overrides, *as_overrides(combination), f"output_dir={run_dir}")
        config = _combination_config(recipe, job_overrides, combination)
        reads += run_inputs(config)
        jobs.append(Job(source=str(recipe) if recipe_file else dict(recipe), overrides=job_overrides,
                        values=combination, run=f"{RUNS_DIR}/{name}", run_dir=run_dir, scored=scored,
                        forgetting=forgetting, progress=progress and parallel == 1, recipe=recipe_file))
    config = _manifest_config(base)
    _check_folder(folder, reads, config)
    return SweepPlan(recipe, folder, grid, jobs, chosen, scored, forgetting, parallel, config, requirements)


def run_sweep(plan: SweepPlan, *, run: Optional[Callable[[Job], dict]] = None,
              on_run: Optional[Callable[[dict, int, int], None]] = None,
              pool: Optional[Callable[[int], Executor]] = None) -> SweepResult:
    """Train every run not finished yet; after each, record it (sweep.jsonl, sweep.md, pareto.html) and call
    `on_run(line, finished, total)`. `run` trains and scores one job (tests pass a stand-in); `pool(workers)`
    makes the executor for `parallel` > 1 (default: worker processes, GPUs shared out among them)."""
    trained = 0
    with open_folder(plan):
        for _, row in _execute(plan, plan.pending(), run or train_and_score, pool):
            record(plan, row, on_run)
            trained += 1
    return result(plan, trained)


@contextmanager
def open_folder(plan: SweepPlan) -> Iterator[None]:
    """Make the sweep folder and its manifest; if the block fails and the folder was made here and holds no
    finished run, remove it again, and the parents made for it (a failed sweep leaves no empty folder behind)."""
    created = [p for p in (plan.out.absolute(), *plan.out.absolute().parents) if not p.exists()]  # innermost first
    plan.out.mkdir(parents=True, exist_ok=True)
    try:
        write_manifest(plan.out, {"recipe": str(plan.source) if not isinstance(plan.source, dict) else None,
                                  "config": plan.config, "grid": plan.grid, "metric": plan.metric.name,
                                  "forgetting": plan.forgetting})
        (plan.out / RUNS_DIR).mkdir(exist_ok=True)
        write_views(plan)
        yield
    except BaseException:
        if created and not plan.finished():
            shutil.rmtree(plan.out, ignore_errors=True)
            for parent in created[1:]:
                if any(parent.iterdir()):
                    break
                parent.rmdir()
        raise


def record(plan: SweepPlan, row: dict, on_run: Optional[Callable[[dict, int, int], None]]) -> None:
    """A run just finished: its line into sweep.jsonl first (so it is never trained again), then the views."""
    record_row(plan.out, row)
    write_views(plan)
    if on_run is not None:
        on_run(row, len(plan.finished()), len(plan.jobs))


def result(plan: SweepPlan, trained: int) -> SweepResult:
    rows = _grid_rows(plan)
    return SweepResult(plan.out, rows, best_row(rows, plan.metric, plan.requirements), plan.metric, trained,
                       plan.requirements)


def sweep(recipe: Source, grid: Union[Iterable[str], Grid], *, overrides: Iterable[str] = (),
          metric: Optional[str] = None, forgetting: bool = False, out: Union[str, Path, None] = None,
          parallel: int = 1, progress: bool = True, require: Iterable[str] = (),
          on_run: Optional[Callable[[dict, int, int], None]] = None) -> SweepResult:
    """plan_sweep, then run_sweep: the one call a notebook needs."""
    plan = plan_sweep(recipe, grid, overrides=overrides, metric=metric, forgetting=forgetting, out=out,
                      parallel=parallel, progress=progress, require=require)
    return run_sweep(plan, on_run=on_run)


def write_views(plan: SweepPlan) -> None:
    """sweep.md, and pareto.html with --forgetting, from the finished runs of this grid."""
    rows = _grid_rows(plan)
    title = f"sweep of {plan.source if not isinstance(plan.source, dict) else 'a config'}"
    table = sweep_markdown(title, list(plan.grid), rows, plan.metric,
                           best_row(rows, plan.metric, plan.requirements), pending=len(plan.jobs) - len(rows),
                           requirements=plan.requirements)
    write_text_atomic(plan.out / TABLE_FILE, table)
    if plan.forgetting:
        write_text_atomic(plan.out / PARETO_FILE, pareto_page(title, rows))


def _grid_rows(plan: SweepPlan) -> list[dict]:
    done = plan.finished()
    return [done[canonical(j.values)] for j in plan.jobs if canonical(j.values) in done]


def _execute(plan: SweepPlan, jobs: list[Job], run: Callable[[Job], dict],
             pool: Optional[Callable[[int], Executor]]) -> Iterator[tuple[Job, dict]]:
    if plan.parallel == 1 or len(jobs) <= 1:
        for job in jobs:
            yield job, run(job)
        return
    workers = min(plan.parallel, len(jobs))
    executor = pool(workers) if pool is not None else process_pool(workers, _gpu_count())
    with executor:
        yield from finished_in_any_order(executor, run, jobs)


def _gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


# ---- checks ----------------------------------------------------------------------------------------------
def _checked_grid(grid: Union[Iterable[str], Grid]) -> Grid:
    if isinstance(grid, dict):
        grid = {k: list(v) for k, v in grid.items()}
        empty = [k for k, v in grid.items() if not v]
        if not grid or empty:
            raise TunesmithError(f"--grid {empty[0]}: no values; list one or more" if empty else
                                 "a sweep needs at least one --grid KEY=V1,V2,..., e.g. --grid train.lr=1e-4,1e-3")
    else:
        grid = parse_grid(list(grid))
    check_keys(grid, field_paths(RunConfig))
    return grid


def _checked_metric(name: Optional[str], scored: bool, forgetting: bool) -> Metric:
    if name is None:
        return default_metric(scored)
    return _measurable(get_metric(name), "--metric " + name, scored, forgetting)


def _checked_requirement(text: str, scored: bool, forgetting: bool) -> Requirement:
    requirement = parse_requirement(text)
    _measurable(requirement.metric, f"--require '{text}'", scored, forgetting)
    return requirement


def _measurable(chosen: Metric, option: str, scored: bool, forgetting: bool) -> Metric:
    if chosen.name in FORGETTING_METRICS and not forgetting:
        raise TunesmithError(f"{option}: {chosen.name} is measured by `eval --forgetting`; add --forgetting")
    if chosen.name in ("score", "perplexity") and not scored:
        raise TunesmithError(f"{option}: {chosen.name} needs eval data to score the runs on; set data.eval or "
                             "data.eval_split > 0 in the recipe, or use train_loss")
    return chosen


def _combination_config(recipe: Source, job_overrides: tuple[str, ...], combination: Combination) -> RunConfig:
    """The run's config; a value the config rejects is blamed on its --grid option, not on a --set."""
    try:
        return load_config(recipe, list(job_overrides))
    except TunesmithError as exc:
        message = str(exc)
        for item, key in zip(as_overrides(combination), combination):
            message = message.replace(f"--set {item}", f"--grid {key} (value {item.split('=', 1)[1]})")
        raise TunesmithError(message) from None


def _manifest_config(base: RunConfig) -> dict:
    config = base.model_dump(mode="json")
    config.pop("output_dir", None)
    return config


def _check_folder(folder: Path, reads: list[Input], config: dict) -> None:
    """The sweep folder may be written: a new or empty folder, or this same sweep's folder (it continues)."""
    manifest = read_manifest(folder) if folder.is_dir() else None
    check_target(folder, reads, may_replace=manifest is not None, flag="--out", example="sweeps/my-sweep",
                 taken=f"already exists, is not empty and holds no {MANIFEST_FILE}; choose a new folder for the sweep")
    if manifest is not None and manifest.get("config") != config:
        changed = _changed_keys(manifest.get("config") or {}, config)
        raise TunesmithError(f"--out '{folder}' holds a sweep of another config (it differs in {', '.join(changed)}); "
                             "rerun with the recipe and --set options it was started with, or choose a new --out")


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(old) | set(new), key=str):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _changed_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            keys.append(f"{prefix}{k}")
    return keys
