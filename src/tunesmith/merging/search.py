"""`tunesmith merge SPEC --search --eval TASK.yaml ...`: find the merge that keeps every task.

Which skills survive a merge depends on the method and its numbers (weights, lambda, density, SLERP's t),
and the right ones differ per set of models; mergekit users tune them by hand against held-out data. The
search does it for them:

1. tasks: each `--eval` recipe's eval set (data.eval, or the split it holds out) is split into a validation
   slice (its first `val_rows` rows), which picks the merge, and the held-out rest, which reports it.
2. references: each input model alone is scored on every slice; a task's reference is the best of them (the
   task's own adapter), so the search needs no pairing of models and tasks.
3. candidates: a small grid (`DEFAULT_GRID`, or `grid` overrides), each merged in memory into one loaded copy
   of the base (only the tensors the merge changes; an adapter's task vector is a few MB) and scored on every
   validation slice. The winner maximises the worst task's score relative to its reference, ties broken by
   the mean relative score, then by grid order.
4. the output folder is what `tunesmith merge` writes for the winner, plus search.jsonl and search.md (every
   candidate's scores), task_scores.json (the winner's and each reference's held-out scores, which
   `tunesmith report` shows) and, when no candidate keeps `goal` of every task, diagnosis.json with the
   per-layer collision numbers of `diagnose.py`.
"""
from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from .. import outdir
from ..config import RunConfig, load_config
from ..data.assemble import eval_conversations
from ..data.templates import apply_template_override
from ..errors import TunesmithError
from ..evaluation.run import score_generations
from ..models import load_model, load_tokenizer
from ..reporting.build import TASK_SCORES_FILE
from . import diagnose
from .run import MergePlan, check_out, merge, merge_tensor, plan_merge, untouched_stay_base
from .sources import Adapter
from .spec import DEFAULT_DENSITY, METHODS, SPARSE_METHODS, TASK_VECTOR_METHODS, MergeSpec, load_merge_spec

DEFAULT_VAL_ROWS = 20
DEFAULT_GOAL = 0.9
EMPHASIS = 0.5  # the other models' weight in the default grid's "one model emphasised" weightings
# Per method, the values tried (weights are added from the number of models: all equal, then each model
# emphasised). 21 candidates for two models: small enough to score in minutes on a CPU.
DEFAULT_GRID: dict[str, dict[str, tuple]] = {
    "linear": {},
    "slerp": {"t": (0.3, 0.5, 0.7)},
    "task_arithmetic": {"lambda": (0.7, 1.0)},
    "ties": {"density": (0.3, 0.7)},
    "dare_ties": {"density": (0.5,)},
}
GRID_KEYS = ("method", "weights", "lambda", "density", "t")
SEARCH_JSONL, SEARCH_MD, DIAGNOSIS_FILE = "search.jsonl", "search.md", "diagnosis.json"


# ---- candidates ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Candidate:
    """One merge to try: a method and the parameters it takes (None: the spec's default)."""

    method: str
    weights: Optional[tuple[float, ...]] = None
    lambda_: Optional[float] = None
    density: Optional[float] = None
    t: Optional[float] = None

    def label(self) -> str:
        parts = [self.method]
        if self.weights is not None:
            parts.append("w=" + ":".join(f"{w:g}" for w in self.weights))
        for key, value in (("lambda", self.lambda_), ("density", self.density), ("t", self.t)):
            if value is not None:
                parts.append(f"{key}={value:g}")
        return " ".join(parts)

    def spec(self, models: Sequence[str], base: str, template: MergeSpec) -> MergeSpec:
        """The merge spec of this candidate over `models`, keeping the template's dtype, seed and sharding."""
        entries = [{"model": m} if self.weights is None else {"model": m, "weight": w}
                   for m, w in zip(models, self.weights or [None] * len(models))]
        raw = {"method": self.method, "base_model": base, "models": entries, "dtype": template.dtype,
               "seed": template.seed, "max_shard_size": template.max_shard_size}
        for key, value in (("lambda", self.lambda_), ("density", self.density), ("t", self.t)):
            if value is not None:
                raw[key] = value
        return load_merge_spec(raw)


def single(index: int, n: int) -> Candidate:
    """Model `index` alone, as a merge: a normalized linear merge with weight 1 on it and 0 on the others."""
    return Candidate("linear", tuple(1.0 if i == index else 0.0 for i in range(n)))


def default_weights(n: int) -> list[tuple[float, ...]]:
    """All models equal, then each one emphasised (weight 1, the others EMPHASIS)."""
    emphasised = [tuple(1.0 if i == j else EMPHASIS for i in range(n)) for j in range(n)] if n > 1 else []
    return [(1.0,) * n, *emphasised]


def parse_grid(items: Sequence[str], n_models: int) -> dict[str, list]:
    """`--grid KEY=V1,V2` items into {key: values}; weights are colon-separated per model (`1:0.5`)."""
    grid: dict[str, list] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or key not in GRID_KEYS:
            raise TunesmithError(f"--grid '{item}': expected KEY=V1,V2,... with KEY one of {', '.join(GRID_KEYS)}, "
                                 "e.g. --grid density=0.3,0.5")
        parts = [v.strip() for v in values.split(",") if v.strip()]
        if not parts:
            raise TunesmithError(f"--grid '{item}': no values after '='; list them, e.g. --grid {key}=...")
        grid[key] = [_grid_value(key, v, item, n_models) for v in parts]
    return grid


def _grid_value(key: str, text: str, item: str, n_models: int):
    if key == "method":
        if text not in METHODS:
            raise TunesmithError(f"--grid '{item}': unknown method '{text}'; choose from {', '.join(METHODS)}")
        return text
    try:
        numbers = tuple(float(x) for x in text.split(":")) if key == "weights" else float(text)
    except ValueError:
        raise TunesmithError(f"--grid '{item}': '{text}' is not a number") from None
    if key == "weights" and len(numbers) != n_models:
        raise TunesmithError(f"--grid '{item}': '{text}' has {len(numbers)} weights but the spec merges {n_models} "
                             f"models; give one per model, separated by ':' (e.g. {':'.join(['1'] * n_models)})")
    return numbers


def expand_grid(n_models: int, grid: Optional[dict[str, list]] = None) -> list[Candidate]:
    """The grid expanded: per method, every combination of the values of the parameters it takes; a key in
    `grid` replaces the default values of every method that takes it, and `grid["method"]` the methods."""
    grid = grid or {}
    methods = list(grid.get("method", DEFAULT_GRID))
    if n_models != 2 and "slerp" in methods:
        if "method" in grid:
            raise TunesmithError(f"--grid method=slerp: slerp interpolates between exactly two models, but the spec "
                                 f"merges {n_models}; drop slerp from --grid method")
        methods.remove("slerp")
    found: list[Candidate] = []
    for method in methods:
        defaults = DEFAULT_GRID.get(method, {})
        takes = {
            "weights": method != "slerp",
            "lambda": method in TASK_VECTOR_METHODS,
            "density": method in SPARSE_METHODS,
            "t": method == "slerp",
        }
        values = {key: (grid.get(key) or defaults.get(key) or (default_weights(n_models) if key == "weights" else [None]))
                  if used else [None] for key, used in takes.items()}
        for weights, lambda_, density, t in itertools.product(values["weights"], values["lambda"], values["density"],
                                                              values["t"]):
            found.append(Candidate(method, weights, lambda_, density, t))
    unique = list(dict.fromkeys(found))
    if not unique:
        raise TunesmithError("--grid leaves no candidate merge to try; name at least one method, e.g. --grid method=ties")
    return unique


# ---- tasks --------------------------------------------------------------------------------------------------
@dataclass
class Task:
    """One task to keep: its recipe (eval data, scorer, template), split into validation and held-out rows."""

    name: str
    recipe: Path
    config: RunConfig
    validation: list
    held_out: list


def load_task(path: Union[str, Path], val_rows: int) -> Task:
    path = Path(path)
    if not path.is_file():
        raise TunesmithError(f"--eval '{path}' does not exist; pass a task recipe (a train recipe whose data.eval and "
                             "eval.scorer say how to score the task)")
    try:
        config = load_config(path)
    except TunesmithError as exc:
        problems = str(exc).splitlines()
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise TunesmithError(f"--eval '{path}' is not a task recipe: {problems[0]}{more}") from None
    rows = eval_conversations(config)
    limit = config.eval.limit
    if len(rows) <= val_rows:
        raise TunesmithError(f"--eval '{path}': its eval set has {len(rows)} rows, so a validation slice of {val_rows} "
                             "leaves none held out; lower --val-rows or give the task more eval rows")
    held_out = rows[val_rows:]
    return Task(path.stem, path, config, rows[:val_rows], held_out[:limit] if limit else held_out)


def load_tasks(paths: Sequence[Union[str, Path]], val_rows: int) -> list[Task]:
    if not paths:
        raise TunesmithError("--search needs at least one --eval TASK.yaml: the tasks the merge must keep")
    if val_rows < 1:
        raise TunesmithError(f"--val-rows {val_rows}: the validation slice needs at least one row")
    tasks = [load_task(p, val_rows) for p in paths]
    names = [t.name for t in tasks]
    for i, task in enumerate(tasks):
        if names.count(task.name) > 1:
            task.name = f"{task.name}-{i}"
    return tasks


def task_reads(tasks: Sequence[Task]) -> list[outdir.Input]:
    """The task recipes and their data files, which the output folder must stay clear of."""
    found: list[outdir.Input] = []
    for task in tasks:
        data = task.config.data
        found += outdir.inputs("task recipe", task.recipe)
        for refs in (data.train, data.eval):
            found += outdir.inputs(f"data of {task.name}", refs if isinstance(refs, list) else [refs] if refs else [])
    return found


# ---- scoring ------------------------------------------------------------------------------------------------
ScoreFn = Callable[[torch.nn.Module, object, Task, list], float]


def generation_score(model, tokenizer, task: Task, rows: list) -> float:
    """The task's score as `tunesmith eval` computes it: greedy answers scored by the recipe's eval.scorer."""
    e = task.config.eval
    return score_generations(model, tokenizer, rows, e.scorer, e.max_new_tokens, e.batch_size, progress=False)[0]


class InMemoryMerge:
    """One loaded copy of the base model, set in place to a merge plan's weights: only the tensors the plan
    changes are merged (for adapters, the ones they touch), and the ones an earlier plan changed are put back."""

    def __init__(self, reference_folder: Path, tasks: Sequence[Task]):
        self.model = load_model(str(reference_folder))
        self.model.eval()
        self.weights = self.model.state_dict()  # shares storage with the parameters
        self.tokenizers = {t.name: _task_tokenizer(reference_folder, t) for t in tasks}
        self.changed: set[str] = set()

    @torch.no_grad()
    def apply(self, plan: MergePlan) -> None:
        names = [n for n in changed_tensors(plan) if n in self.weights]
        for name in self.changed - set(names):
            self.weights[name].copy_(plan.reference.read(name))
        dtypes = {p.name: p.dtype for p in plan.tensors}
        for name in names:
            # Cast through the output dtype, so the scores are those of the folder the merge would write.
            self.weights[name].copy_(merge_tensor(plan, name).to(dtypes[name]))
        self.changed = set(names)

    def score(self, score_fn: ScoreFn, task: Task, rows: list) -> float:
        return float(score_fn(self.model, self.tokenizers[task.name], task, rows))


def _task_tokenizer(reference_folder: Path, task: Task):
    tokenizer = load_tokenizer(str(reference_folder))
    apply_template_override(tokenizer, task.config.data.chat_template)
    return tokenizer


def changed_tensors(plan: MergePlan) -> list[str]:
    """The floating-point tensors a merge can make differ from the base."""
    floats = [n for n, info in plan.reference.infos.items() if info.dtype.is_floating_point]
    if all(isinstance(s, Adapter) for s in plan.inputs) and untouched_stay_base(plan.spec):
        touched = set().union(*(s.touched() for s in plan.inputs))
        return [n for n in floats if n in touched]
    return floats


# ---- choosing -----------------------------------------------------------------------------------------------
def relative(scores: dict[str, float], references: dict[str, float]) -> dict[str, float]:
    """Each task's score as a share of its reference; a task no input solves (reference 0) counts as kept."""
    return {task: (s / references[task] if references[task] > 0 else 1.0) for task, s in scores.items()}


def ranking_key(rel: dict[str, float]) -> tuple[float, float]:
    """(worst relative score, mean relative score): larger is better. Rounded to 1e-6, so shares that differ
    only by float32 rounding of the merged weights tie and the mean decides (a share of rows scored is k/n)."""
    values = list(rel.values())
    return round(min(values), 6), round(sum(values) / len(values), 6)


def pick(rows: Sequence[dict]) -> dict:
    """The row with the best ranking key; the earliest in grid order on an exact tie."""
    return max(rows, key=lambda r: (r["worst"], r["mean"], -r["index"]))


@dataclass
class SearchResult:
    out: Path
    winner: Candidate
    rows: list[dict]  # one per candidate, in grid order
    references: dict  # task -> {"score", "model"} on the validation slice
    held_out: dict  # task -> {"scorer", "score", "examples", "alone", "alone_model", "singles"}
    goal: float
    reached: bool
    diagnosis: list = field(default_factory=list)  # diagnose.LayerDiagnosis, when the goal is not reached


def search(
    spec, tasks: Sequence[Union[str, Path]], out: Union[str, Path], *, grid: Optional[dict[str, list]] = None,
    candidates: Optional[Sequence[Candidate]] = None, val_rows: int = DEFAULT_VAL_ROWS, goal: float = DEFAULT_GOAL,
    overwrite: bool = False, progress: bool = True,
    score_fn: ScoreFn = generation_score, spec_file: Optional[Union[str, Path]] = None,
    on_row: Optional[Callable[[dict], None]] = None,
) -> SearchResult:
    """Try every candidate merge of the spec's models, keep the one that best keeps every task, write it to `out`.

    `spec`: a MergeSpec, dict or YAML path; its models, base_model, dtype and seed are used, its method and
    parameters replaced by each candidate's. `tasks`: task recipes. `grid`: `parse_grid`'s overrides of the
    default grid, or `candidates`: the exact list to try.
    `score_fn(model, tokenizer, task, rows)`: a task's score on some of its rows (default: greedy generation
    and the recipe's scorer). `on_row(row)` is called after each candidate (the CLI prints it).
    Everything is checked before the first candidate is scored; nothing is written until the last.
    """
    if isinstance(spec, (str, Path)):
        spec_file = spec
    spec = load_merge_spec(spec)
    if not 0 < goal <= 1:
        raise TunesmithError(f"--goal {goal}: the share of each task's score to keep must be in (0, 1], e.g. 0.9")
    first = plan_merge(spec)
    base = spec.base_model or first.reference.ref
    models = [e.model for e in spec.models if e.model != base]
    loaded = load_tasks(tasks, val_rows)
    grid_candidates = list(candidates) if candidates else expand_grid(len(models), grid)
    specs = [checked_spec(c, models, base, spec) for c in grid_candidates]
    reads = task_reads(loaded)
    check_out(first, out, overwrite, spec_file, reads)

    memory = InMemoryMerge(first.reference.folder, loaded)

    def scored(plan: MergePlan, held_out: bool = False) -> dict[str, float]:
        memory.apply(plan)
        return {t.name: memory.score(score_fn, t, t.held_out if held_out else t.validation) for t in loaded}

    singles = [plan_merge(single(i, len(models)).spec(models, base, spec)) for i in range(len(models))]
    references = best_alone([scored(p) for p in singles], models)
    ref_scores = {name: r["score"] for name, r in references.items()}

    rows = []
    bar = tqdm(total=len(grid_candidates), desc="merge search", unit="merge", disable=not progress, dynamic_ncols=True)
    for index, candidate in enumerate(grid_candidates):
        start = time.perf_counter()
        plan = plan_merge(specs[index])
        scores = scored(plan)
        rel = relative(scores, ref_scores)
        worst, mean = ranking_key(rel)
        rows.append({"index": index, "candidate": candidate.label(), "spec": plan.spec.resolved(), "scores": scores,
                     "relative": rel, "worst": worst, "mean": mean, "seconds": round(time.perf_counter() - start, 2)})
        bar.update(1)
        if on_row is not None:
            on_row(rows[-1])
    bar.close()
    best = pick(rows)
    winner = grid_candidates[best["index"]]
    winner_plan = plan_merge(specs[best["index"]])
    reached = best["worst"] >= goal

    held_out = held_out_table(loaded, models, scored(winner_plan, held_out=True),
                              [scored(p, held_out=True) for p in singles])
    diagnosis = [] if reached else diagnose.diagnose_plan(winner_plan, _diagnosis_density(winner))
    result = SearchResult(Path(out), winner, rows, references, held_out, goal, reached, diagnosis)
    result.out = merge(winner_plan.spec, out, overwrite, progress=progress, spec_file=spec_file, also_reads=reads,
                       then=lambda folder: write_search_files(folder, result))
    return result


def checked_spec(candidate: Candidate, models: Sequence[str], base: str, template: MergeSpec) -> MergeSpec:
    """The candidate's merge spec, or a TunesmithError naming the candidate (before anything is scored)."""
    try:
        return candidate.spec(models, base, template)
    except TunesmithError as exc:
        raise TunesmithError(f"--grid: the candidate '{candidate.label()}' is not a valid merge: {exc}") from None


def best_alone(singles: Sequence[dict[str, float]], models: Sequence[str]) -> dict[str, dict]:
    """Per task, the best score of a single model and which model it is (the task's own adapter)."""
    return {task: max(({"score": s[task], "model": m} for m, s in zip(models, singles)), key=lambda r: r["score"])
            for task in singles[0]}


def held_out_table(tasks: Sequence[Task], models: Sequence[str], merged: dict[str, float],
                   singles: Sequence[dict[str, float]]) -> dict:
    """task_scores.json: per task, the merge's held-out score beside the best single model's (`alone`) and
    every single model's."""
    alone = best_alone(singles, models)
    return {t.name: {"scorer": t.config.eval.scorer, "score": merged[t.name], "examples": len(t.held_out),
                     "alone": alone[t.name]["score"], "alone_model": alone[t.name]["model"],
                     "singles": {m: s[t.name] for m, s in zip(models, singles)}} for t in tasks}


def _diagnosis_density(winner: Candidate) -> float:
    return winner.density if winner.density is not None else DEFAULT_DENSITY


# ---- the written tables -------------------------------------------------------------------------------------
def write_search_files(folder: Path, result: SearchResult) -> None:
    with open(folder / SEARCH_JSONL, "w", encoding="utf-8") as f:
        for row in result.rows:
            f.write(json.dumps(row) + "\n")
    (folder / SEARCH_MD).write_text(render_markdown(result), encoding="utf-8")
    (folder / TASK_SCORES_FILE).write_text(json.dumps(result.held_out, indent=2) + "\n", encoding="utf-8")
    if result.diagnosis:
        payload = {"density": _diagnosis_density(result.winner), "overall": diagnose.overall(result.diagnosis),
                   "layers": [d.as_dict() for d in result.diagnosis]}
        (folder / DIAGNOSIS_FILE).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def verdict(result: SearchResult) -> str:
    """One sentence: the goal reached, or by how much the best merge misses it and on which task."""
    best = next(r for r in result.rows if r["candidate"] == result.winner.label())
    if result.reached:
        return (f"{result.winner.label()} keeps at least {result.goal:.0%} of every task's score on the validation "
                f"slices (worst: {best['worst']:.0%})")
    task, share = min(best["relative"].items(), key=lambda kv: kv[1])
    return (f"no candidate keeps {result.goal:.0%} of every task: the best, {result.winner.label()}, keeps "
            f"{share:.0%} of {task}'s score, missing the goal by {(result.goal - share) * 100:.0f} points")


def explain(layers: Sequence[diagnose.LayerDiagnosis]) -> list[str]:
    """Lines that read the diagnosis: how the task vectors relate overall, and the layers where they collide."""
    if not layers:
        return []
    summary = diagnose.overall(layers)
    cos = summary["median_cosine"]
    relation = ("nearly orthogonal: they do not cancel in weight space" if abs(cos) < 0.1
                else "opposed: they cancel each other" if cos < 0 else "aligned")
    lines = [f"task vectors per layer: median cosine {cos:+.3f} ({relation}), lowest {summary['lowest_cosine']:+.3f}; "
             f"TIES sign conflicts on {summary['conflict']:.0%} of the entries two models keep (independent vectors: "
             "about 50%)"]
    ratios = [(d, max(d.norms) / min(d.norms)) for d in layers if len(d.norms) > 1 and min(d.norms) > 0]
    if ratios:
        typical = sorted(r for _, r in ratios)[len(ratios) // 2]
        lines.append(f"norm ratio of the larger to the smaller task vector: median {typical:.1f}x per layer "
                     "(in a sum, the larger update dominates where both act)")
    worst = sorted(layers, key=lambda d: d.cosine)[:3]
    lines.append("lowest-cosine layers: " + ", ".join(f"{d.layer} ({d.cosine:+.3f}, conflicts {d.conflict:.0%})"
                                                      for d in worst))
    return lines


def render_markdown(result: SearchResult) -> str:
    tasks = list(result.references)
    lines = ["# Merge search", "", verdict(result) + ".", "",
             "Validation slices, best model alone: " + ", ".join(
                 f"{t} {r['score']:.0%} ({r['model']})" for t, r in result.references.items()) + ".", "",
             "| # | candidate | " + " | ".join(tasks) + " | worst (share of best alone) | mean share |",
             "| ---: | --- | " + " | ".join("---:" for _ in tasks) + " | ---: | ---: |"]
    for r in result.rows:
        mark = " (chosen)" if r["candidate"] == result.winner.label() else ""
        lines.append(f"| {r['index']} | {r['candidate']}{mark} | " + " | ".join(f"{r['scores'][t]:.0%}" for t in tasks)
                     + f" | {r['worst']:.0%} | {r['mean']:.0%} |")
    lines += ["", "## Held out", "", "| task | rows | chosen merge | best model alone | |", "| --- | ---: | ---: | ---: | --- |"]
    for t, h in result.held_out.items():
        lines.append(f"| {t} | {h['examples']} | {h['score']:.0%} | {h['alone']:.0%} | {h['alone_model']} |")
    if result.diagnosis:
        lines += ["", "## Where the tasks collide", "", *[f"- {line}" for line in explain(result.diagnosis)], "",
                  "| layer | cosine | norms | overlap | sign conflicts |", "| --- | ---: | --- | ---: | ---: |"]
        for d in result.diagnosis:
            lines.append(f"| {d.layer} | {d.cosine:+.3f} | {' / '.join(f'{n:.3f}' for n in d.norms)} | "
                         f"{d.overlap:.0%} | {d.conflict:.0%} |")
    return "\n".join(lines) + "\n"
