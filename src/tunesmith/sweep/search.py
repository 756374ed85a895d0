"""`--search optuna --trials N`: Optuna's TPE sampler picks which combinations of the grid to train, instead of
training them all. It needs the optional `optuna` package (`pip install 'tunesmith[sweep]'`).

The search writes the same sweep folder as the grid: a run it picks is trained, scored and recorded exactly
like a grid run. Rerunning continues: the finished runs are told to a new study first, and the search stops
once N runs are finished (or every combination is). A combination Optuna picks again is told its recorded
number, not trained twice.
"""
from __future__ import annotations

import importlib.util
from typing import Callable, Optional

from ..errors import TunesmithError
from .grid import canonical
from .job import Job, run_job as train_and_score
from .runner import SweepPlan, SweepResult, open_folder, record, result

PACKAGE_HINT = "pip install 'tunesmith[sweep]' (or pip install optuna)"
SEED = 0  # the same sweep folder and trials give the same picks


def check_search(plan: SweepPlan, trials: int) -> None:
    """Everything the search needs, before anything is touched."""
    if trials < 1:
        raise TunesmithError(f"--trials {trials}: must be 1 or more (runs the search trains)")
    if plan.parallel > 1:
        raise TunesmithError("--parallel applies to the grid; --search optuna trains one trial at a time (each pick "
                             "learns from the ones before): drop --parallel or --search")
    if importlib.util.find_spec("optuna") is None:
        raise TunesmithError(f"--search optuna needs the optuna package, which is not installed; run `{PACKAGE_HINT}`")


def search_sweep(plan: SweepPlan, trials: int, *, run: Optional[Callable[[Job], dict]] = None,
                 on_run: Optional[Callable[[dict, int, int], None]] = None) -> SweepResult:
    """Train up to `trials` runs of the grid that Optuna picks, recording each like `run_sweep`."""
    import optuna  # an optional extra, loaded only by the search

    check_search(plan, trials)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    keys = list(plan.grid)
    # indices, not values: Optuna's categorical choices must be scalars, and a grid value may be a list
    spaces = {k: optuna.distributions.CategoricalDistribution(list(range(len(plan.grid[k])))) for k in keys}
    direction = "maximize" if plan.metric.higher_is_better else "minimize"
    study = optuna.create_study(direction=direction, sampler=optuna.samplers.TPESampler(seed=SEED))
    jobs = {canonical(j.values): j for j in plan.jobs}
    trained = 0
    with open_folder(plan):
        done = plan.finished()
        for row in done.values():
            params = {k: _index(plan.grid[k], row["values"][k]) for k in keys}
            _tell_new(study, optuna, params, spaces, _value(row, plan))
        for _ in range(trials + 10 * len(plan.jobs)):  # picks of finished runs do not count; this bounds them
            if len(done) >= min(trials, len(plan.jobs)):
                break
            trial = study.ask(spaces)
            values = {k: plan.grid[k][trial.params[k]] for k in keys}
            row = done.get(canonical(values))
            if row is None:
                row = (run or train_and_score)(jobs[canonical(values)])
                record(plan, row, on_run)
                done = plan.finished()
                trained += 1
            _tell(study, optuna, trial, _value(row, plan))
    return result(plan, trained)


def _value(row: dict, plan: SweepPlan) -> Optional[float]:
    """The metric, or None (a failed trial, which TPE steers away from) for a run that misses a --require."""
    if not all(q.met(row) for q in plan.requirements):
        return None
    return row["metrics"].get(plan.metric.name)


def _tell(study, optuna, trial, value: Optional[float]) -> None:
    if value is None:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    else:
        study.tell(trial, value)


def _tell_new(study, optuna, params: dict, spaces: dict, value: Optional[float]) -> None:
    if value is None:
        return
    study.add_trial(optuna.trial.create_trial(params=params, distributions=spaces, value=value))


def _index(values: list, value) -> int:
    return [canonical(v) for v in values].index(canonical(value))
