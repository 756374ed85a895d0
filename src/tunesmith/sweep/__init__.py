"""`tunesmith sweep`: a grid of settings, each its own run, with a resumable results table and the best run named."""
from .runner import SweepPlan, SweepResult, plan_sweep, run_sweep, sweep

__all__ = ["SweepPlan", "SweepResult", "plan_sweep", "run_sweep", "sweep"]
