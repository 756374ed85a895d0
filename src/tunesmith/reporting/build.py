"""RUN/report.html: the run on one page, readable offline: curves, data, answers, forgetting, config, doctor.

Everything is inline (styles, SVG plots drawn in svg.py, the plotted numbers); the page has no script and fetches
nothing. The report reads the run folder and writes only report.html, through a temporary sibling and a rename."""
from __future__ import annotations

import json
import os
from html import escape
from pathlib import Path

from ..data.assemble import prepare_data
from ..data.dataset import PreparedData
from ..data.masking import IGNORE_INDEX, TokenizedExample
from ..data.report import token_texts
from ..doctor.run import diagnose, read_metrics
from ..errors import TunesmithError
from ..merging.run import SPEC_FILE as MERGE_SPEC_FILE
from ..models import load_tokenizer
from ..rundir import CONFIG_FILE, DATA_STATS_FILE, SUMMARY_FILE, load_run_config
from .svg import histogram, line_chart

REPORT_FILE = "report.html"
EVAL_FILE = "eval.json"
EVAL_BASE_FILE = "eval_base.json"
FORGETTING_FILE = "forgetting.json"
TASK_SCORES_FILE = "task_scores.json"
TOKEN_VIEWS = 2

# (chart title, metrics.jsonl keys plotted in it)
CURVES = (
    ("loss", ("loss", "eval_loss")),
    ("learning rate", ("learning_rate",)),
    ("grad norm", ("grad_norm",)),
    ("tokens per second", ("tokens_per_second",)),
    ("peak memory (MiB)", ("peak_memory_mib",)),
    ("task score", ("eval_score",)),
)

STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1120px;color:#111;padding:0 16px}
h1{font-size:22px}h2{font-size:17px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:28px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
.plots{display:flex;flex-wrap:wrap;gap:12px}.plot{border:1px solid #eee;background:#fff}
.plot .series{fill:none;stroke-width:1.8}.plot .axis{stroke:#555}.plot .grid{stroke:#eee}
.plot .tick{font-size:10px;fill:#555}.plot .title{font-size:12px;font-weight:600}.plot .legend{font-size:11px}
.plot .bar{fill:#bfdbfe}
.tokens{font-family:ui-monospace,monospace;white-space:pre-wrap;border:1px solid #eee;padding:8px;line-height:1.9}
.tok{border-radius:2px;padding:1px 0}.tok.loss{background:#bbf7d0}.tok.masked{color:#666}
.finding{border-left:4px solid #d97706;padding:4px 10px;margin:8px 0;background:#fffbeb}
.finding.fatal{border-color:#dc2626;background:#fef2f2}
pre{background:#f6f6f6;padding:8px;overflow:auto}.muted{color:#666}
"""


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except ValueError:
        return None


def _table(rows: list[tuple[str, object]]) -> str:
    return "<table>" + "".join(f"<tr><th>{escape(str(k))}</th><td>{escape(str(v))}</td></tr>" for k, v in rows) + "</table>"


def curves_section(rows: list[dict]) -> str:
    plots = []
    for title, keys in CURVES:
        series = {k: [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))] for k in keys}
        chart = line_chart(title, {k: v for k, v in series.items() if v})
        if chart:
            plots.append(chart)
    if not plots:
        return "<h2>Curves</h2><p class='muted'>No metrics logged yet (metrics.jsonl is empty).</p>"
    return "<h2>Curves</h2><div class='plots'>" + "".join(plots) + "</div>"


def token_view(tokenizer, ex) -> str:
    """One example as training sees it: supervised tokens highlighted, each token's id and reason on hover."""
    spans = []
    for tid, text, label, why in zip(ex.input_ids, token_texts(tokenizer, ex.input_ids), ex.labels, ex.categories):
        kind = "loss" if label != IGNORE_INDEX else "masked"
        hover = f"id {tid} · {why} · {'carries loss' if kind == 'loss' else 'no loss'}"
        spans.append(f'<span class="tok {kind}" title="{escape(hover)}">{escape(text)}</span>')
    return f"<p class='muted'>{escape(ex.where)}{' (truncated)' if ex.truncated else ''}</p><div class='tokens'>{''.join(spans)}</div>"


def _sequence(ex) -> TokenizedExample | None:
    """The tokens an example trains on: itself, or the chosen reply of a preference pair."""
    if isinstance(ex, TokenizedExample):
        return ex
    chosen = getattr(ex, "chosen", None)
    return chosen if isinstance(chosen, TokenizedExample) else None


def data_section(stats: dict | None, data: PreparedData | None, tokenizer, why_missing: str = "") -> str:
    out = ["<h2>Data</h2>"]
    if stats:
        train = stats.get("train", {})
        keys = ("rows", "examples", "tokens", "supervised_tokens", "supervised_share", "length_p50", "length_p90",
                "length_max", "dropped_too_long", "truncated", "dropped_no_supervised_tokens")
        heads = "".join(f"<th>{escape(k)}</th>" for k in ("split",) + keys)
        body = "".join("<tr><td>" + split + "</td>" + "".join(f"<td>{escape(str(s.get(k, '')))}</td>" for k in keys) + "</tr>"
                       for split, s in (("train", train), ("eval", stats.get("eval", {}))))
        out.append(f"<div style='overflow-x:auto'><table><tr>{heads}</tr>{body}</table></div>")
    sequences = [s for s in map(_sequence, data.train) if s is not None] if data is not None else []
    if sequences:
        out.append("<div class='plots'>" + histogram("training example length", [len(e.input_ids) for e in sequences]) + "</div>")
        out.append("<h3>What carries loss</h3><p class='muted'>Green tokens carry loss; hover a token for its id and why.</p>")
        out.extend(token_view(tokenizer, ex) for ex in sequences[:TOKEN_VIEWS])
    elif why_missing:
        out.append(f"<p class='muted'>No length histogram or token view: {escape(why_missing)}</p>")
    return "".join(out)


def answers_section(tuned: dict | None, base: dict | None) -> str:
    if not tuned and not base:
        return ("<h2>Before / after</h2><p class='muted'>No eval results yet: run <code>tunesmith eval RUN</code> (and "
                "<code>--base</code> for the base model).</p>")
    out = ["<h2>Before / after</h2>"]
    scores = [(f"{r['model']} ({label})", f"{r['scorer']} {r['score']:.1%}, eval loss {r['eval_loss']:.4f} on {r['examples']} examples")
              for label, r in (("base", base), ("fine-tuned", tuned)) if r]
    out.append(_table(scores))
    t_samples = (tuned or {}).get("samples", [])
    b_samples = (base or {}).get("samples", [])
    n = max(len(t_samples), len(b_samples))
    heads = "<tr><th>expected</th>" + ("<th>base</th>" if b_samples else "") + ("<th>fine-tuned</th>" if t_samples else "") + "</tr>"
    rows = []
    for i in range(n):
        ref = (t_samples[i] if i < len(t_samples) else b_samples[i])["reference"]
        cells = [ref] + ([b_samples[i]["prediction"] if i < len(b_samples) else ""] if b_samples else []) + \
                ([t_samples[i]["prediction"] if i < len(t_samples) else ""] if t_samples else [])
        rows.append("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in cells) + "</tr>")
    out.append(f"<table>{heads}{''.join(rows)}</table>")
    return "".join(out)


def forgetting_section(report: dict | None) -> str:
    if not report:
        return ""
    g, q = report["general"], report.get("general_questions", {})
    rows = [("general perplexity", f"base {g['base_perplexity']:.3f} -> fine-tuned {g['perplexity']:.3f} ({g['relative_change']:+.1%})")]
    if q:
        rows.append(("base answers to general questions", f"perplexity {q['base_answer_perplexity']:.3f} -> "
                     f"{q['answer_perplexity']:.3f}; same answer word for word {q['same_answers']:.0%}"))
    out = ["<h2>Forgetting</h2>", _table(rows)]
    seq = report.get("sequence")
    if seq:
        heads = "<tr><th>after training</th>" + "".join(f"<th>task {j + 1}</th>" for j in range(len(seq["runs"]))) + "</tr>"
        body = "".join(f"<tr><td>{i + 1}: {escape(run)}</td>" + "".join(f"<td>{x:.1%}</td>" for x in row) + "</tr>"
                       for i, (run, row) in enumerate(zip(seq["runs"], seq["R"])))
        out.append(f"<p>Accuracy matrix R</p><table>{heads}{body}</table>")
        out.append(_table([("average accuracy", f"{seq['average_accuracy']:.1%}"), ("backward transfer (BWT)", f"{seq['bwt']:+.1%}")]))
    return "".join(out)


def doctor_section(findings) -> str:
    if not findings:
        return "<h2>Doctor</h2><p>No findings.</p>"
    items = []
    for f in findings:
        extra = f"<br>examples: {escape(', '.join(f.example_ids))}" if f.example_ids else ""
        cause = f"<br>cause: {escape(f.cause)}" if f.cause else ""
        items.append(f"<div class='finding{' fatal' if f.fatal else ''}'><b>{escape(f.message)}</b>{cause}"
                     f"<br>remedy: {escape(f.remedy)}{extra}</div>")
    return "<h2>Doctor</h2>" + "".join(items)


def summary_section(run: Path, summary: dict | None) -> str:
    if not summary:
        return "<p class='muted'>No summary.json: the run did not finish.</p>"
    keys = ("model", "method", "steps", "epochs", "train_loss", "eval_loss", "train_seconds", "tokens_per_second",
            "trainable_parameters")
    rows = [(k, summary[k]) for k in keys if k in summary]
    best = summary.get("best")
    if best:
        rows.append(("kept adapter", f"step {best['step']}: {best['why']} ({best['metric']} {best['value']}); "
                     f"last weights in {best.get('last') or 'the run folder'}"))
    return _table(rows)


def _load_data(run: Path, config, tokenizer, data):
    """The run's data through the one assembly path, when the files are still readable."""
    if data is not None:
        return tokenizer, data, ""
    try:
        tokenizer = tokenizer or load_tokenizer(str(run) if (run / "tokenizer_config.json").is_file() else config.model,
                                                config.trust_remote_code)
        return tokenizer, prepare_data(config, tokenizer), ""
    except (TunesmithError, OSError) as exc:
        return tokenizer, None, str(exc)


def is_merge_folder(path: Path) -> bool:
    """A `tunesmith merge` output: the merged model with its spec, and no run config."""
    return (path / MERGE_SPEC_FILE).is_file() and not (path / CONFIG_FILE).is_file()


def task_scores_section(scores: dict | None) -> str:
    """Per-task scores of a merged model (TASK_SCORES_FILE: task -> {scorer, score, examples[, alone]})."""
    if not scores:
        return (f"<h2>Task scores</h2><p class='muted'>No {TASK_SCORES_FILE}: score the merged model on each task "
                "(bench/merge_tasks.py writes it) to see them here.</p>")
    heads = "<tr><th>task</th><th>scorer</th><th>merged</th><th>its adapter alone</th><th>examples</th></tr>"
    body = "".join(
        f"<tr><td>{escape(task)}</td><td>{escape(str(r.get('scorer', '')))}</td><td>{r['score']:.1%}</td>"
        f"<td>{'' if r.get('alone') is None else format(r['alone'], '.1%')}</td><td>{r.get('examples', '')}</td></tr>"
        for task, r in scores.items()
    )
    return f"<h2>Task scores</h2><table>{heads}{body}</table>"


def build_merge_report(path: Path) -> str:
    """A merge folder's page: the spec it was merged with and its per-task scores when they were written."""
    sections = [
        f"<h1>tunesmith merge: {escape(path.resolve().name)}</h1>",
        task_scores_section(_read_json(path / TASK_SCORES_FILE)),
        "<h2>Merge spec</h2><pre>" + escape((path / MERGE_SPEC_FILE).read_text(encoding="utf-8")) + "</pre>",
    ]
    return _page(f"merge: {path.resolve().name}", sections)


def _page(title: str, sections: list[str]) -> str:
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>tunesmith report: {escape(title)}"
            f"</title><style>{STYLE}</style></head><body>{''.join(sections)}</body></html>\n")


def build_report(run: str | Path, *, tokenizer=None, data: PreparedData | None = None) -> str:
    """The HTML of `run`'s report (a run folder or a merge folder). `tokenizer` and `data` skip loading them
    again (train passes its own)."""
    path = Path(run)
    if is_merge_folder(path):
        return build_merge_report(path)
    config = load_run_config(path)
    tokenizer, data, why = _load_data(path, config, tokenizer, data)
    findings = diagnose(path)
    sections = [
        f"<h1>tunesmith run: {escape(path.resolve().name)}</h1>",
        summary_section(path, _read_json(path / SUMMARY_FILE)),
        doctor_section(findings),
        curves_section(read_metrics(path)),
        data_section(_read_json(path / DATA_STATS_FILE), data, tokenizer, why),
        answers_section(_read_json(path / EVAL_FILE), _read_json(path / EVAL_BASE_FILE)),
        forgetting_section(_read_json(path / FORGETTING_FILE)),
        "<h2>Config</h2><pre>" + escape((path / CONFIG_FILE).read_text(encoding="utf-8")) + "</pre>",
    ]
    return _page(path.resolve().name, sections)


def write_report(run: str | Path, *, tokenizer=None, data: PreparedData | None = None) -> Path:
    """Build the report, then write RUN/report.html through a temporary sibling and a rename; nothing else in
    the run folder is touched."""
    path = Path(run)
    html = build_report(path, tokenizer=tokenizer, data=data)
    target = path / REPORT_FILE
    tmp = path / f".{REPORT_FILE}.tmp"
    tmp.write_text(html, encoding="utf-8")
    os.replace(tmp, target)
    return target
