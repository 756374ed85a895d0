"""The `tunesmith` command line: argument parsing and printing over the Python API, nothing else."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .allocator import restart_with_allocator
from .errors import TunesmithError
from .methods import registry


class _App(typer.Typer):
    """The `tunesmith` script calls the app itself: a bug outside `_run` is one line too, not pages of traceback."""

    def __call__(self, *args, **kwargs):
        try:
            return super().__call__(*args, **kwargs)
        except Exception as exc:
            _crash(exc)


app = _App(help="Fine-tune your own language model end to end.", no_args_is_help=True, add_completion=False)
models_app = typer.Typer(help="Built-in models: list them, convert them into the cache.", no_args_is_help=True)
config_app = typer.Typer(help="Show a recipe with every default filled in.", no_args_is_help=True)
data_app = typer.Typer(help="Look at the data the way the model will see it.", no_args_is_help=True)
datagen_app = typer.Typer(help="Build training data: self-instruct, evol, augment, dedup, filter, select.",
                          no_args_is_help=True)
@app.callback()
def _setup() -> None:
    from .quiet import quiet_libraries

    quiet_libraries()


app.add_typer(models_app, name="models")
app.add_typer(config_app, name="config")
app.add_typer(data_app, name="data")
app.add_typer(datagen_app, name="datagen")

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)
SetOption = typer.Option(None, "--set", help="Override a config key, e.g. --set train.lr=1e-4 (repeatable).")
JsonOption = typer.Option(False, "--json", help="Print machine-readable JSON.")


def _fail(exc: Exception) -> None:
    # Escaped: messages quote data such as "[question, answer]", which rich would read as markup.
    err.print(f"[bold red]error:[/] {escape(str(exc))}", markup=True, highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def _crash(exc: Exception) -> None:
    """A bug, not a user error: one line naming the exception and the file that holds its traceback; exit 1."""
    path = _write_traceback(exc)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    where = f"full traceback in {path}" if path else "the traceback could not be written to a file"
    err.print(f"[bold red]error:[/] unexpected {type(exc).__name__}: {escape(first)} ({where}; please report it)",
              markup=True, highlight=False, soft_wrap=True)
    raise SystemExit(1)


def _write_traceback(exc: Exception) -> Optional[Path]:
    """The traceback, with the command line, in $TUNESMITH_HOME/logs, or the system temp dir if that fails."""
    import tempfile
    import traceback

    from .paths import tunesmith_home

    text = f"command: {' '.join(sys.argv)}\n\n" + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    for folder in (tunesmith_home() / "logs", Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix="crash-", suffix=".log", dir=folder)
            with open(fd, "w", encoding="utf-8") as f:
                f.write(text)
            return Path(name)
        except OSError:
            continue
    return None


def _run(fn):
    """Call fn; user errors become a one-line message and exit code 1, and so do bugs (see _crash)."""
    try:
        return fn()
    except TunesmithError as exc:
        _fail(exc)
    except Exception as exc:
        _crash(exc)


def _check_options(*rules: tuple[bool, str]) -> None:
    """Values typer's own checks would reject in a usage box (exit 2): the first broken rule is one line, exit 1."""
    for broken, message in rules:
        if broken:
            _fail(TunesmithError(message))


def _print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _config(recipe: str, overrides: Optional[List[str]]):
    from .config import load_config

    return load_config(recipe, overrides or [])


# ---- models -----------------------------------------------------------------------------------
@models_app.command("list")
def models_list(as_json: bool = JsonOption):
    """List the built-in models and whether they are installed and cached."""
    from .models import list_models

    rows = list_models()
    if as_json:
        return _print_json(rows)
    table = Table("name", "installed", "cached", "description")
    for r in rows:
        table.add_row(r["name"], "yes" if r["installed"] else "no", "yes" if r["cached"] else "no", r["description"])
    out.print(table)


@models_app.command("pull")
def models_pull(name: str, force: bool = typer.Option(False, help="Convert again even if cached.")):
    """Convert a built-in model into the cache (done automatically on first use)."""
    from .models import pull_builtin

    path = _run(lambda: pull_builtin(name, force=force))
    out.print(f"{name}: {path}")


# ---- config -----------------------------------------------------------------------------------
@config_app.command("show")
def config_show(recipe: str, set_: Optional[List[str]] = SetOption, as_json: bool = JsonOption):
    """Print the resolved config: the recipe, the overrides, and every default."""
    from .config import config_to_yaml

    cfg = _run(lambda: _config(recipe, set_))
    if as_json:
        return _print_json(cfg.model_dump(mode="json"))
    sys.stdout.write(config_to_yaml(cfg))


# ---- data -------------------------------------------------------------------------------------
def _tokenizer_for(cfg):
    from .models import load_tokenizer

    return load_tokenizer(cfg.model, cfg.trust_remote_code)


WHY_STYLE = {"assistant": "bold green", "end_of_turn": "bold green", "user": "cyan", "system": "magenta", "tool": "yellow", "template": "dim"}


@data_app.command("inspect")
def data_inspect(
    recipe: str,
    n: int = typer.Option(2, "--n", help="How many training examples to show."),
    set_: Optional[List[str]] = SetOption,
    as_json: bool = JsonOption,
):
    """Token table of the first examples: each token, whether it carries loss, and why."""
    from .data.report import inspect_examples

    def go():
        cfg = _config(recipe, set_)
        return inspect_examples(cfg, _tokenizer_for(cfg), n)

    examples = _run(go)
    if as_json:
        return _print_json({"examples": [
            {"index": e["index"], "tokens": [{"id": t["id"], "text": t["text"], "loss": t["loss"]} for t in e["tokens"]]}
            for e in examples
        ]})
    for e in examples:
        supervised = sum(t["loss"] for t in e["tokens"])
        table = Table(title=f"example {e['index']} ({e['where']}): {len(e['tokens'])} tokens, {supervised} carry loss",
                      title_justify="left")
        for col in ("pos", "id", "token", "loss", "why"):
            table.add_column(col)
        for pos, t in enumerate(e["tokens"]):
            style = WHY_STYLE.get(t["why"], "") if t["loss"] or t["why"] != "assistant" else "green"
            table.add_row(str(pos), str(t["id"]), repr(t["text"]), "yes" if t["loss"] else "-", t["why"].replace("_", "-"), style=style)
        out.print(table)


@data_app.command("stats")
def data_stats_cmd(recipe: str, set_: Optional[List[str]] = SetOption, as_json: bool = JsonOption):
    """Examples, tokens, supervised share, length percentiles, dropped and truncated counts."""
    from .data.report import data_stats

    def go():
        cfg = _config(recipe, set_)
        return data_stats(cfg, _tokenizer_for(cfg))

    stats = _run(go)
    if as_json:
        return _print_json(stats)
    table = Table("", "train", "eval")
    for key in stats["train"]:
        table.add_row(key, str(stats["train"][key]), str(stats["eval"].get(key, "")))
    out.print(table)
    _print_mix(stats.get("mix"))


def _print_mix(mix: dict | None) -> None:
    """Where mixed training examples come from: each dataset's used/available count and share, and the replay."""
    for d in (mix or {}).get("datasets", []):
        out.print(f"{d['source']}: {d['used']} of {d['available']} examples ({d['share']:.1%})", highlight=False)
    replay = (mix or {}).get("replay")
    if replay:
        out.print(f"replay {replay['source']}: {replay['examples']} examples ({replay['share']:.1%})", highlight=False)


@data_app.command("check")
def data_check(recipe: str, set_: Optional[List[str]] = SetOption, as_json: bool = JsonOption):
    """Pre-flight doctor: fails (exit 1) on data that would train the wrong thing."""
    from .data.report import check_data

    def go():
        cfg = _config(recipe, set_)
        return check_data(cfg, _tokenizer_for(cfg))

    findings = _run(go)
    errors = [f for f in findings if f.level == "error"]
    if as_json:
        _print_json({"ok": not errors, "findings": [f.__dict__ for f in findings]})
    else:
        colors = {"error": "red", "warning": "yellow", "info": "blue"}
        for f in findings:
            out.print(f"[{colors[f.level]}]{f.level}[/] {f.where}: {f.message}", highlight=False, soft_wrap=True)
        out.print("[red]check failed[/]" if errors else "[green]check passed[/]")
    if errors:
        raise typer.Exit(1)


# ---- methods ----------------------------------------------------------------------------------
@app.command()
def methods(as_json: bool = JsonOption):
    """The fine-tuning methods: when to use each, and its key options."""
    from .methods import ADVICE, METHODS

    if as_json:
        return _print_json([{"name": m.name, "when": m.when, "options": m.key_options} for m in METHODS.values()])
    table = Table("method.name", "use it when", "key options (method.*)")
    for m in METHODS.values():
        table.add_row(m.name, m.when, m.key_options)
    out.print(table)
    out.print(ADVICE, highlight=False)


# ---- train / eval / chat / export ---------------------------------------------------------------
@app.command()
def train(
    ctx: typer.Context,
    recipe: str,
    set_: Optional[List[str]] = SetOption,
    max_steps: Optional[int] = typer.Option(None, help="Stop after N optimizer steps."),
    output_dir: Optional[str] = typer.Option(None, help="Write the run here instead of the recipe's output_dir."),
    overwrite: bool = typer.Option(False, help="Replace a non-empty output_dir."),
    resume: bool = typer.Option(False, help="Continue from the last checkpoint in output_dir."),
    force: bool = typer.Option(False, "--force", help="With --resume: continue even though the config differs from "
                               "the run's (only train.max_steps, train.epochs, save/logging steps and eval.* may change "
                               "without it)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print data stats, the memory bill vs the measured peak "
                                 "and the time per step over 2 real steps on the longest examples; write no run."),
    as_json: bool = JsonOption,
    nproc: int = typer.Option(1, "--nproc", help="Training processes on this machine, one per GPU: runs under torchrun "
                              "with the recipe's distributed.strategy (ddp by default)."),
    nnodes: int = typer.Option(1, "--nnodes", help="Machines in the run (torchrun --nnodes); start the same command "
                               "on each."),
    node_rank: int = typer.Option(0, "--node-rank", help="This machine's number, 0 to nnodes-1 (0 at --master-addr)."),
    master_addr: Optional[str] = typer.Option(None, "--master-addr", help="Address of the --node-rank 0 machine "
                                              "(needed with --nnodes > 1)."),
    master_port: Optional[int] = typer.Option(None, "--master-port", help="A free TCP port on --master-addr "
                                              "(default 29500; on one machine a free one is picked)."),
):
    """Fine-tune a model as the recipe says; writes the adapter, metrics and a summary to output_dir.

    Ctrl-C (SIGINT) or SIGTERM finishes the current step, saves a checkpoint there and prints the command
    that resumes the run; the exit code is then 130 (SIGINT) or 143 (SIGTERM).
    """
    from .training import distributed
    from .training.interrupt import TrainingInterrupted
    from .training.run import train as run_train

    _check_options(
        (max_steps is not None and max_steps < 1, f"--max-steps {max_steps}: must be 1 or more (optimizer steps)"),
        (resume and overwrite, "--resume continues the run in output_dir and --overwrite replaces it; pass one of them"),
    )
    overrides = list(set_ or [])
    if max_steps is not None:
        overrides.append(f"train.max_steps={max_steps}")
    if output_dir is not None:
        overrides.append(f"output_dir={output_dir}")

    if dry_run:
        return _train_dry_run(recipe, overrides, as_json)
    launch = distributed.Launch(nproc, nnodes, node_rank, master_addr, master_port)
    if launch.wanted:
        return _train_launch(ctx, launch, recipe, overrides, overwrite=overwrite, resume=resume)

    def go():
        cfg = _config(recipe, overrides)
        return run_train(cfg, overwrite=overwrite, resume=resume, force=force, progress=not as_json, recipe=recipe)

    try:
        result = _run(go)
    except TrainingInterrupted as stop:
        _train_interrupted(ctx, stop)
    if not distributed.is_main_process():
        return
    if as_json:
        return _print_json({"output_dir": str(result.output_dir), **result.summary})
    s = result.summary
    out.print(
        f"trained {s['steps']} steps in {s['train_seconds']:.0f} s ({s['tokens_per_second']:.0f} tokens/s); "
        f"train loss {s['train_loss']:.4f}" + (f", eval loss {s['eval_loss']:.4f}" if "eval_loss" in s else "")
    )
    out.print(f"saved to {result.output_dir}")


@app.command("eval")
def eval_cmd(
    target: str = typer.Argument(..., help="A run folder or a recipe."),
    base: bool = typer.Option(False, help="Score the untouched base model on the same data."),
    limit: Optional[int] = typer.Option(None, help="Score only the first N eval examples."),
    forgetting: bool = typer.Option(False, "--forgetting", help="Also measure general perplexity (held-out Python "
                                    "reference text), base vs fine-tuned; with a task sequence, R, average accuracy and BWT."),
    previous: Optional[List[str]] = typer.Option(None, "--previous", help="--forgetting: earlier runs of the task "
                                                 "sequence, oldest first (default: the run's continual.previous)."),
    general_tokens: Optional[int] = typer.Option(None, "--general-tokens", help="--forgetting: tokens of general text "
                                                 "(default eval.general_tokens)."),
    adapter: Optional[str] = typer.Option(None, "--adapter", help="Serve with one task's adapters (NAME, see the run's "
                                          "continual.json) or route each example by its task prefix (auto)."),
    as_json: bool = JsonOption,
):
    """Eval loss, perplexity and the task score by greedy generation."""
    from .evaluation.run import evaluate

    _check_options((limit is not None and limit < 1, f"--limit {limit}: must be 1 or more (eval examples to score)"))
    if forgetting:
        from .evaluation.forgetting import forgetting_report

        if base:
            _fail(TunesmithError("--forgetting already compares the base with the fine-tuned model; drop --base"))

        report = _run(lambda: forgetting_report(target, previous=previous or None, limit=limit,
                                                general_tokens=general_tokens, adapter=adapter, progress=not as_json))
        return _print_json(report) if as_json else _print_forgetting(report)
    report = _run(lambda: evaluate(target, base=base, limit=limit, progress=not as_json, adapter=adapter))
    if as_json:
        return _print_json(report)
    out.print(
        f"{report['model']}: {report['scorer']} {report['score']:.1%} on {report['examples']} examples; "
        f"eval loss {report['eval_loss']:.4f}, perplexity {report['perplexity']:.3f}"
    )
    for s in report["samples"][:3]:
        out.print(f"  [dim]ref[/]  {s['reference']}\n  [dim]got[/]  {s['prediction']}", highlight=False)


def _print_forgetting(report: dict) -> None:
    t, g = report["task"], report["general"]
    out.print(f"{report['model']}: {t['scorer']} {t['score']:.1%} on {t['examples']} examples; eval loss {t['eval_loss']:.4f}",
              highlight=False)
    out.print(f"general perplexity ({g['tokens']} tokens of {g['corpus']}): base {g['base_perplexity']:.3f} -> "
              f"fine-tuned {g['perplexity']:.3f} ({g['relative_change']:+.1%})", highlight=False, soft_wrap=True)
    q = report["general_questions"]
    out.print(f"base model's answers to {q['questions']} general questions: perplexity base {q['base_answer_perplexity']:.3f} -> "
              f"fine-tuned {q['answer_perplexity']:.3f} ({q['relative_change']:+.1%}); same answer word for word: "
              f"{q['same_answers']:.0%}", highlight=False, soft_wrap=True)
    seq = report.get("sequence")
    if seq:
        table = Table("after training", *[f"task {j + 1}" for j in range(len(seq["runs"]))],
                      title="accuracy matrix R (row: after training task i; column: score on task j)", title_justify="left")
        for i, (run, row) in enumerate(zip(seq["runs"], seq["R"])):
            table.add_row(f"{i + 1}: {run}", *[f"{x:.1%}" for x in row])
        out.print(table)
        out.print(f"average accuracy {seq['average_accuracy']:.1%}, backward transfer (BWT) {seq['bwt']:+.1%}", highlight=False)


@app.command()
def chat(
    target: str = typer.Argument(..., help="A run folder, a recipe, or a model reference."),
    prompt: Optional[str] = typer.Option(None, help="Answer this once and exit."),
    system: Optional[str] = typer.Option(None, help="System message."),
    base: bool = typer.Option(False, help="Talk to the base model without the adapter."),
    max_new_tokens: int = typer.Option(256, help="Longest answer."),
    temperature: float = typer.Option(0.0, help="0 is greedy; above 0 samples."),
    adapter: Optional[str] = typer.Option(None, "--adapter", help="Serve with one task's adapters (NAME) or route "
                                          "each message by its task prefix (auto)."),
):
    """Talk to a model: /reset clears the history, /system TEXT sets the system message, /exit quits."""
    from .chat import make_chat_session
    from .inference import load_for_inference

    _check_options(
        (max_new_tokens < 1, f"--max-new-tokens {max_new_tokens}: must be 1 or more"),
        (temperature < 0, f"--temperature {temperature}: must be 0 (greedy) or more (sampling)"),
    )

    loaded = _run(lambda: load_for_inference(target, base=base))
    session = _run(lambda: make_chat_session(loaded, adapter, system=system, max_new_tokens=max_new_tokens,
                                             temperature=temperature))  # plain ChatSession unless tasks/prefixes

    def answer(text: str) -> None:
        _run(lambda: session.reply(text, on_piece=lambda p: (sys.stdout.write(p), sys.stdout.flush())))
        sys.stdout.write("\n")

    if prompt is not None:
        return answer(prompt)
    err.print(f"chatting with {loaded.label}; /reset, /system TEXT, /exit", markup=False, highlight=False)
    _chat_loop(session, answer)


def _chat_loop(session, answer) -> None:
    """Read lines until /exit, /quit or the end of input; slash commands change the session, the rest is answered."""
    while True:
        try:
            text = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            sys.stdout.write("\n")  # the shell's prompt starts on a line of its own, not after "> "
            break
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            session.reset()
            err.print("history cleared")
        elif text == "/system" or text.startswith("/system "):  # "/systems are..." is a message, not a command
            session.set_system(text[len("/system"):].strip())
            session.reset()
            err.print(f"system message: {session.system!r} (history cleared)", markup=False, highlight=False)
        elif text:
            answer(text)


@app.command()
def serve(
    target: str = typer.Argument(..., help="A run folder, a trained recipe, or a model reference."),
    adapter: Optional[List[str]] = typer.Option(None, "--adapter", help="Also serve another run's adapter trained "
                                                "on the same base, as NAME=RUN (repeatable)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on; 0.0.0.0 lets other machines in."),
    port: int = typer.Option(8000, help="Port to listen on."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="TUNESMITH_API_KEY", show_envvar=True,
                                          help="Require 'Authorization: Bearer KEY' on every request."),
    base: bool = typer.Option(False, help="Serve the recipe's base model without the adapter."),
    max_batch: int = typer.Option(16, help="Most answers generated together in one batch."),
    max_queue: int = typer.Option(64, help="Most requests waiting; beyond it the server answers 429."),
):
    """Serve a model and its adapters over an OpenAI-compatible API (/v1/chat/completions, /v1/completions)."""
    from .serving.server import exposure_warning, serve as run_server

    warning = exposure_warning(host, api_key)
    if warning:
        err.print(warning, markup=False, highlight=False)

    def ready(url: str, names: List[str]) -> None:
        err.print(f"serving {target} at {url} (models: {', '.join(names)}); Ctrl+C stops", markup=False, highlight=False)

    _run(lambda: run_server(target, adapter or [], host=host, port=port, api_key=api_key, base=base,
                            max_batch=max_batch, max_queue=max_queue, on_ready=ready))


@app.command()
def export(
    runs: List[str] = typer.Argument(..., help="The run folder; with --vllm one or more, each RUN or NAME=RUN."),
    out_dir: Optional[str] = typer.Option(None, "--out", help="Folder to write (hf and gguf formats)."),
    merge: bool = typer.Option(True, "--merge/--no-merge", help="Merge the adapter into the base weights."),
    overwrite: bool = typer.Option(False, help="Replace a non-empty --out (or --vllm) folder."),
    fmt: str = typer.Option("hf", "--format", help="hf: a Hugging Face folder; gguf: one .gguf + an Ollama Modelfile "
                            "(llama.cpp, Ollama, LM Studio)."),
    quant: Optional[str] = typer.Option(None, "--quant", help="With --format gguf: f16 (default), bf16, q8_0 or q4_0."),
    vllm: Optional[str] = typer.Option(None, "--vllm", help="Write DIR for vLLM instead: the LoRA adapters, serve.sh "
                                       "(vllm serve BASE --enable-lora --lora-modules NAME=PATH ...) and the chat template."),
):
    """Write a plain Hugging Face model folder (merged), a copy of the adapter, a GGUF file, or a vLLM folder."""
    _check_options(
        (fmt not in ("hf", "gguf"), f"--format {fmt}: unknown; choose hf or gguf"),
        (vllm is not None and (out_dir is not None or fmt != "hf" or quant is not None),
         "--vllm DIR writes its own folder of adapters; leave out --out, --format and --quant"),
        (vllm is None and len(runs) > 1, f"export takes one run folder ({len(runs)} given); several only with --vllm"),
        (vllm is None and out_dir is None, "export needs --out DIR (or --vllm DIR for a vLLM folder)"),
        (quant is not None and fmt != "gguf", "--quant applies to --format gguf"),
        (fmt == "gguf" and not merge, "--format gguf writes the merged model; leave out --no-merge"),
    )
    if vllm is not None:
        from .exporting.vllm import export_vllm

        path = _run(lambda: export_vllm(runs, vllm, overwrite=overwrite))
        out.print(f"vLLM folder written to {path}; start the server with: bash {Path(path) / 'serve.sh'}",
                  highlight=False, soft_wrap=True)
        return
    if fmt == "gguf":
        from .exporting.gguf import export_gguf

        path = _run(lambda: export_gguf(runs[0], out_dir, quant=quant or "f16", overwrite=overwrite))
        out.print(f"GGUF written to {path} (Modelfile beside it); run it with: llama-cli -m {path}, or "
                  f"cd {path.parent} && ollama create NAME -f Modelfile", highlight=False, soft_wrap=True)
        return
    from .exporting import export as run_export

    path = _run(lambda: run_export(runs[0], out_dir, merge=merge, overwrite=overwrite))
    what = "merged model" if merge else "adapter"
    out.print(f"{what} written to {path}; load it with AutoModelForCausalLM.from_pretrained('{Path(path)}')"
              if merge else f"{what} written to {path}")


@app.command("merge")
def merge_cmd(
    spec: str = typer.Argument(..., help="A merge spec YAML (method, base_model, models, ...)."),
    out_dir: str = typer.Option(..., "--out", help="Folder to write."),
    overwrite: bool = typer.Option(False, help="Replace a non-empty --out folder."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a spec key, e.g. --set lambda=0.8 or "
                                             "--set models.1.weight=0.5 (repeatable)."),
    search: bool = typer.Option(False, "--search", help="Try a grid of methods and parameters on the spec's models "
                                "(the spec's own method and parameters are replaced) and write the one that best "
                                "keeps every --eval task."),
    eval_: Optional[List[str]] = typer.Option(None, "--eval", help="With --search: a task recipe whose eval set and "
                                              "scorer the merge must keep (repeatable, one per task)."),
    grid: Optional[List[str]] = typer.Option(None, "--grid", help="With --search: replace the default values of a "
                                             "key, e.g. --grid method=ties,linear --grid density=0.3,0.5 --grid "
                                             "weights=1:1,1:0.5 (repeatable)."),
    val_rows: int = typer.Option(20, "--val-rows", help="With --search: eval rows per task that choose the merge; "
                                 "the rest report it."),
    goal: float = typer.Option(0.9, "--goal", help="With --search: the share of each task's best single-model score "
                               "a merge should keep; below it, the per-layer diagnosis is written."),
):
    """Merge models and adapters (linear, slerp, task_arithmetic, ties, dare_linear, dare_ties) into one folder."""
    import time

    from .merging.run import merge as run_merge
    from .merging.spec import load_merge_spec

    _check_options((bool(eval_) and not search, "--eval scores candidate merges: add --search"),
                   (search and not eval_, "--search needs at least one --eval TASK.yaml: the tasks the merge must keep"))
    start = time.perf_counter()
    if search:
        return _merge_search(spec, set_ or [], eval_, grid or [], out_dir, overwrite, val_rows, goal)
    path = _run(lambda: run_merge(load_merge_spec(spec, set_ or []), out_dir, overwrite=overwrite, spec_file=spec))
    out.print(f"merged into {path} in {time.perf_counter() - start:.1f} s; load it with "
              f"AutoModelForCausalLM.from_pretrained('{Path(path)}')", highlight=False, soft_wrap=True)


def _merge_search(spec: str, overrides: List[str], tasks: List[str], grid: List[str], out_dir: str, overwrite: bool,
                  val_rows: int, goal: float) -> None:
    from .merging.search import SEARCH_MD, explain, parse_grid, search, verdict
    from .merging.spec import load_merge_spec

    def row(r: dict) -> None:
        scores = "  ".join(f"{task} {score:.0%}" for task, score in r["scores"].items())
        out.print(f"  {r['candidate']:40s} {scores}  worst {r['worst']:.0%}", highlight=False, soft_wrap=True)

    def go():
        merge_spec = load_merge_spec(spec, overrides)
        n_models = len([e for e in merge_spec.models if e.model != merge_spec.base_model])
        return search(merge_spec, tasks, out_dir, grid=parse_grid(grid, n_models), val_rows=val_rows, goal=goal,
                      overwrite=overwrite, spec_file=spec, on_row=row, progress=False)

    result = _run(go)
    out.print(verdict(result), highlight=False, soft_wrap=True)
    for task, h in result.held_out.items():
        out.print(f"  held out {task}: {h['score']:.0%} merged, {h['alone']:.0%} alone ({h['examples']} rows)",
                  highlight=False, soft_wrap=True)
    for line in explain(result.diagnosis):
        out.print(f"  {line}", highlight=False, soft_wrap=True)
    out.print(f"merged into {result.out}; every candidate in {Path(result.out) / SEARCH_MD}", highlight=False,
              soft_wrap=True)


# ---- sweep ------------------------------------------------------------------------------------
@app.command()
def sweep(
    recipe: str,
    grid: Optional[List[str]] = typer.Option(None, "--grid", help="KEY=V1,V2,...: values of one config key, typed like --set "
                                   "(repeatable; every combination is one run)."),
    metric: Optional[str] = typer.Option(None, "--metric", help="Which run is best: score, eval_loss, train_loss, "
                                         "perplexity, general_change, general_perplexity, train_seconds (default: the "
                                         "task score when the recipe has eval data, else eval_loss)."),
    forgetting: bool = typer.Option(False, "--forgetting", help="Also run `eval --forgetting` on each run and plot "
                                    "task score vs general-perplexity change (pareto.html)."),
    require: Optional[List[str]] = typer.Option(None, "--require", help="METRIC>=VALUE or METRIC<=VALUE: only runs "
                                                "that keep it may be best (repeatable), e.g. --metric general_change "
                                                "--require score>=0.93."),
    out_dir: Optional[str] = typer.Option(None, "--out", help="The sweep folder (default: the recipe's output_dir + "
                                          "-sweep); rerunning the same command there continues it."),
    parallel: int = typer.Option(1, "--parallel", help="Runs trained at once, each in its own process (for GPU "
                                 "machines; GPUs are shared out round-robin)."),
    search: str = typer.Option("grid", "--search", help="grid (every combination) or optuna (--trials of them, "
                               "picked by Optuna's TPE; needs `pip install 'tunesmith\\[sweep]'`)."),
    trials: Optional[int] = typer.Option(None, "--trials", help="--search optuna: how many runs to train."),
    set_: Optional[List[str]] = SetOption,
    as_json: bool = JsonOption,
):
    """Train the recipe once per combination of the --grid values; writes OUT/runs/*, sweep.jsonl, sweep.md (the
    best run named) and, with --forgetting, pareto.html. Rerunning skips the finished runs."""
    from .sweep import plan_sweep, run_sweep
    from .sweep.results import TABLE_FILE
    from .sweep.table import best_line
    from .sweep.search import check_search, search_sweep
    from .training.interrupt import TrainingInterrupted

    _check_options(
        (search not in ("grid", "optuna"), f"--search {search}: choose grid or optuna"),
        (search == "optuna" and trials is None, "--search optuna needs --trials N (how many runs to train)"),
        (search == "grid" and trials is not None, "--trials applies to --search optuna; drop it to train the whole grid"),
    )

    def report(row: dict, finished: int, total: int) -> None:
        numbers = ", ".join(f"{k} {v}" for k, v in row["metrics"].items())
        err.print(f"[{finished}/{total}] {row['run']}: {numbers}", markup=False, highlight=False, soft_wrap=True)

    def go():
        plan = plan_sweep(recipe, grid or [], overrides=set_ or [], metric=metric, forgetting=forgetting, out=out_dir,
                          parallel=parallel, progress=not as_json, require=require or [])
        if search == "optuna":
            check_search(plan, trials)
            return search_sweep(plan, trials, on_run=report)
        return run_sweep(plan, on_run=report)

    try:
        result = _run(go)
    except TrainingInterrupted as stop:
        err.print(f"sweep {stop}; rerun the same command to continue: finished runs are kept, the stopped one is "
                  "trained again", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(stop.exit_code)
    m, best = result.metric, result.best
    if as_json:
        return _print_json({"out": str(result.out), "metric": m.name, "higher_is_better": m.higher_is_better,
                            "require": [str(q) for q in result.requirements], "best": best, "runs": result.rows,
                            "trained": result.trained})
    out.print(f"{len(result.rows)} runs finished ({result.trained} trained now); table {result.out / TABLE_FILE}",
              highlight=False)
    out.print(best_line(result.rows, m, best, result.requirements).replace("**", ""), highlight=False)


# ---- plan -------------------------------------------------------------------------------------
def _train_interrupted(ctx: typer.Context, stop) -> None:
    """One line: where the run stopped and the command that continues it (this one, with --resume instead of
    --overwrite); exit 128 + the signal's number, as a shell reports a process the signal ended."""
    import shlex

    from .training import distributed

    argv = distributed.worker_argv(ctx, skip=("overwrite", "resume", "force", "dry_run"))
    command = shlex.join(["tunesmith", *argv, "--resume"])
    err.print(f"{stop}; resume with: {command}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(stop.exit_code)


def _train_launch(ctx: typer.Context, launch, recipe: str, overrides: List[str], *, overwrite: bool, resume: bool) -> None:
    """Check the launch options, the recipe and the output folder once, then run this command in torchrun's workers
    and exit with their exit code."""
    from .training import distributed
    from .training.run import check_output

    def go():
        launch.validate()
        cfg = _config(recipe, overrides)
        distributed.check_strategy(cfg)
        if launch.node_rank == 0:  # the machine whose rank 0 writes the run folder
            check_output(cfg, recipe, overwrite=overwrite, resume=resume)
        return distributed.launch(launch, distributed.worker_argv(ctx))

    code = _run(go)
    if code:
        raise typer.Exit(code)


def _train_dry_run(recipe: str, overrides: List[str], as_json: bool) -> None:
    from .planning.measure import dry_run
    from .planning.render import print_bill, print_measurement

    result = _run(lambda: dry_run(_config(recipe, overrides)))
    m = result["measurement"]
    if as_json:
        return _print_json({"data": result["data"], "bill": m.bill.as_dict(), "measurement": m.as_dict()})
    table = Table("", "train", "eval", title="data", title_justify="left")
    for key in result["data"]["train"]:
        table.add_row(key, str(result["data"]["train"][key]), str(result["data"]["eval"].get(key, "")))
    out.print(table)
    _print_mix(result["data"].get("mix"))
    print_bill(out, m.bill)
    print_measurement(out, m)
    out.print(f"time per step: {m.seconds_per_step:.2f} s ({m.tokens_per_second:.0f} tokens/s) at micro batch "
              f"{m.batch} x {m.seq_len} tokens; dry run: nothing written", highlight=False)


def _rank_help() -> str:
    """What --rank sets: r, unless a method's registry entry names another option."""
    others = [f"{m.rank_option} for {m.name}" for m in registry.METHODS.values() if m.rank_option not in (None, "r")]
    return f"Adapter rank (r; {'; '.join(others)})."


@app.command()
def plan(
    model: str = typer.Option("smollm2-135m-instruct", help="Built-in or bundled name (llama-3.1-8b, qwen2.5-7b, ...), "
                              "a folder or config.json, or a cached hub id."),
    method: Optional[str] = typer.Option(None, help=f"{', '.join(registry.METHODS)} (default {registry.DEFAULT_METHOD}). "
                                         "Without it and with --budget: recommend one."),
    rank: Optional[int] = typer.Option(None, help=_rank_help()),
    targets: Optional[str] = typer.Option(None, help="Comma-separated target modules, e.g. q_proj,v_proj (default all-linear)."),
    seq_len: int = typer.Option(2048, help="Tokens per sequence."),
    batch: int = typer.Option(1, help="Micro batch (sequences per device and step)."),
    grad_accum: int = typer.Option(1, help="Gradient accumulation steps."),
    budget: Optional[str] = typer.Option(None, help="Memory per device, e.g. 24GiB (2^30 bytes each) or 80GB (10^9 bytes each)."),
    precision: str = typer.Option("auto", help="auto (what train would run here), fp32, amp (fp32 weights + bf16 "
                                  "autocast), bf16 (bf16 frozen base, fp32 adapters; or bf16 weights + fp32 "
                                  "master), pure-bf16."),
    checkpointing: bool = typer.Option(False, help="Gradient checkpointing."),
    optimizer: str = typer.Option("adamw", help="adamw, adamw8bit or galore."),
    devices: int = typer.Option(1, help="Data-parallel devices."),
    zero: int = typer.Option(0, help="ZeRO stage: 0 (DDP), 1, 2, 3 (= FSDP full sharding)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    loss: str = typer.Option("selective", help="selective (tunesmith's chunked loss, the default) or full "
                             "(transformers' loss: tokens x vocab logits)."),
    multi_task: bool = typer.Option(False, "--multi-task", help="Recommender: several tasks (LoRA with a higher rank)."),
    objective: str = typer.Option("sft", help="train.objective: sft, or dpo, orpo, simpo (then --batch counts "
                                  "pairs and --seq-len is one reply's sequence; dpo adds its reference pass)."),
    distill: bool = typer.Option(False, "--distill", help="Price regularize.distill: the teacher pass and KD loss "
                                 "(methods without adapters: a frozen copy of the model as the teacher)."),
    ewc: bool = typer.Option(False, "--ewc", help="Price regularize.ewc: the Fisher pass before training, the Fisher "
                             "and starting values kept all run, the penalty."),
    measure: bool = typer.Option(False, "--measure", help="Also run 2 real steps here and print predicted vs measured."),
    explain: bool = typer.Option(False, "--explain", help="One sentence per line on why it costs what it costs."),
    as_json: bool = JsonOption,
):
    """The memory bill of a training setup, or (with --budget and no --method) the recipe that fits."""
    from .planning import auto_device, auto_precision, plan as make_plan
    from .planning.render import print_bill, print_measurement, print_recommendation

    target_list = [t.strip() for t in targets.split(",") if t.strip()] if targets else None
    if method is None and budget is not None:
        from .planning.recommend import recommend

        dev = auto_device() if device == "auto" else device
        prec = auto_precision(dev) if precision == "auto" else precision
        rec = _run(lambda: recommend(model, budget, seq_len=seq_len, multi_task=multi_task, precision=prec,
                                     device=dev, devices=devices, zero=zero))
        return _print_json(rec.as_dict()) if as_json else print_recommendation(out, rec)
    bill = _run(lambda: make_plan(model, method or registry.DEFAULT_METHOD, rank=rank, targets=target_list, seq_len=seq_len,
                                  batch=batch, grad_accum=grad_accum, precision=precision, checkpointing=checkpointing,
                                  optimizer=optimizer, devices=devices, zero=zero, device=device, loss=loss,
                                  objective=objective, distill=distill, ewc=ewc, budget=budget))
    result = {"bill": bill.as_dict()}
    if not as_json:
        print_bill(out, bill, explain=explain)
    if measure:
        from .config import load_config
        from .planning.measure import measure as run_measure
        from .planning import method_config
        from .planning.setup import FULL_LOSS

        def go():
            section = method_config(method or registry.DEFAULT_METHOD, rank, target_list)
            regularize = {**({"distill": {}} if distill else {}), **({"ewc": {}} if ewc else {})}
            cfg = load_config({"model": model, "data": {"train": "(synthetic)"}, "method": section.model_dump(),
                               "train": {"gradient_checkpointing": checkpointing, "selective_loss": loss != FULL_LOSS,
                                         "objective": objective}, "regularize": regularize})
            return run_measure(cfg, seq_len=seq_len, batch=batch, grad_accum=grad_accum)

        m = _run(go)
        result["measurement"] = m.as_dict()
        if not as_json:
            print_measurement(out, m)
    if as_json:
        _print_json(result)
    if bill.fits is False:
        raise typer.Exit(2)


# ---- datagen ----------------------------------------------------------------------------------
TeacherOption = typer.Option("smollm2-135m-instruct", "--teacher", help="An OpenAI-compatible endpoint "
                             "(http://host:port/v1: tunesmith serve, vLLM, Ollama, llama.cpp, a hosted API) or a "
                             "model to load here (a built-in name, a folder, a hub id).")
TeacherModelOption = typer.Option(None, "--model", help="Model name at the endpoint (default: the first it lists).")
KeyEnvOption = typer.Option(None, "--key-env", help="Environment variable holding the endpoint's API key "
                            "(default: OPENAI_API_KEY if set; local servers need none).")
ConcurrencyOption = typer.Option(4, "--concurrency", help="Requests in flight at once (endpoint teachers).")
RetriesOption = typer.Option(5, "--retries", help="Retries on 429, 5xx, timeouts and refused connections.")
DataSeedOption = typer.Option(0, "--seed", help="Sampling seed: the same seed and data give the same requests.")
TeacherTokensOption = typer.Option(256, "--max-tokens", help="Most tokens per teacher reply (a reply cut by it is "
                                   "dropped); 256 suits the built-in model on a CPU, raise it for a served teacher.")
OutFileOption = typer.Option(..., "--out", help="Output .jsonl file (generating steps continue it when rerun).")


def _teacher(teacher: str, model: Optional[str], key_env: Optional[str], concurrency: int, retries: int):
    """The spec only: each step checks its files before it loads the model or asks the server."""
    from .datagen.teachers import TeacherSpec

    return TeacherSpec(teacher, model=model, key_env=key_env, concurrency=concurrency, retries=retries)


def _datagen_report(report, as_json: bool) -> None:
    path = report.write()
    if as_json:
        return _print_json(report.as_dict() | {"report": str(path)})
    for line in report.lines():
        out.print(escape(line), highlight=False)
    out.print(f"  report {escape(str(path))}", highlight=False)


@datagen_app.command("self-instruct")
def datagen_self_instruct(
    seeds: str, n: int = typer.Option(100, "--n", help="New instructions to add (each with its instances)."),
    out_file: str = OutFileOption, teacher: str = TeacherOption, model: Optional[str] = TeacherModelOption,
    key_env: Optional[str] = KeyEnvOption, concurrency: int = ConcurrencyOption, retries: int = RetriesOption,
    seed: int = DataSeedOption, max_tokens: int = TeacherTokensOption, as_json: bool = JsonOption,
):
    """Grow instructions from seed rows with Self-Instruct (ROUGE-L < 0.7 against the pool), with instances."""
    from .datagen.self_instruct import SelfInstructOptions, self_instruct

    _check_options((n < 1, f"--n must be at least 1, got {n}"))
    _run(lambda: _datagen_report(self_instruct(seeds, out_file, _teacher(teacher, model, key_env, concurrency, retries),
                                               SelfInstructOptions(n=n, seed=seed, batch=concurrency,
                                                                   max_tokens=max_tokens)), as_json))


@datagen_app.command("evol")
def datagen_evol(
    seeds: str, rounds: int = typer.Option(1, "--rounds", help="Evolution rounds."), out_file: str = OutFileOption,
    teacher: str = TeacherOption, model: Optional[str] = TeacherModelOption, key_env: Optional[str] = KeyEnvOption,
    concurrency: int = ConcurrencyOption, retries: int = RetriesOption, seed: int = DataSeedOption,
    max_tokens: int = TeacherTokensOption, as_json: bool = JsonOption,
):
    """Evolve instructions with Evol-Instruct (in-depth and in-breadth) and answer them."""
    from .datagen.evol import EvolOptions, evol

    _check_options((rounds < 1, f"--rounds must be at least 1, got {rounds}"))
    _run(lambda: _datagen_report(evol(seeds, out_file, _teacher(teacher, model, key_env, concurrency, retries),
                                      EvolOptions(rounds=rounds, seed=seed, max_tokens=max_tokens)), as_json))


@datagen_app.command("augment")
def datagen_augment(
    data: str, ops: str = typer.Option("paraphrase", "--ops", help="Comma-separated: paraphrase, backtranslate, cot."),
    pivot: str = typer.Option("French", "--pivot", help="Pivot language of backtranslate."),
    out_file: str = OutFileOption, teacher: str = TeacherOption, model: Optional[str] = TeacherModelOption,
    key_env: Optional[str] = KeyEnvOption, concurrency: int = ConcurrencyOption, retries: int = RetriesOption,
    seed: int = DataSeedOption, max_tokens: int = TeacherTokensOption, as_json: bool = JsonOption,
):
    """Paraphrase or back-translate instructions, or expand answers with chain of thought."""
    from .datagen.augment import AugmentOptions, augment

    options = AugmentOptions(ops=tuple(o.strip() for o in ops.split(",") if o.strip()), pivot=pivot, seed=seed,
                             max_tokens=max_tokens)
    _run(lambda: options.check() or _datagen_report(
        augment(data, out_file, _teacher(teacher, model, key_env, concurrency, retries), options), as_json))


@datagen_app.command("dedup")
def datagen_dedup(
    data: str, out_file: str = OutFileOption,
    threshold: float = typer.Option(0.8, "--threshold", help="Jaccard similarity above which rows are near duplicates."),
    shingle: int = typer.Option(3, "--shingle", help="Words per shingle."), as_json: bool = JsonOption,
):
    """Drop exact (normalised) and near (MinHash LSH) duplicates, keeping the first of each cluster."""
    from .datagen.dedup import DedupOptions, dedup

    _run(lambda: _datagen_report(dedup(data, out_file, DedupOptions(threshold=threshold, shingle=shingle)), as_json))


@datagen_app.command("filter")
def datagen_filter(
    data: str, out_file: str = OutFileOption,
    tokenizer: str = typer.Option("smollm2-135m-instruct", "--tokenizer", help="Model whose tokenizer counts tokens."),
    min_tokens: int = typer.Option(1, "--min-tokens", help="Fewest answer tokens."),
    max_tokens: int = typer.Option(2048, "--max-tokens", help="Most tokens of instruction + input + answer."),
    language: str = typer.Option("en", "--language", help="en (mostly ASCII letters) or any."),
    as_json: bool = JsonOption,
):
    """Drop rows by rule (length, empty or refusal answers, language, copied instruction, loader errors)."""
    from .datagen.filtering import FilterOptions, filter_file

    options = FilterOptions(min_tokens=min_tokens, max_tokens=max_tokens, language=language)
    _run(lambda: _datagen_report(filter_file(data, out_file, options, model=tokenizer), as_json))


@datagen_app.command("select")
def datagen_select(
    data: str, n: int = typer.Option(1000, "--n", help="Rows to keep."), out_file: str = OutFileOption,
    model: str = typer.Option("smollm2-135m-instruct", "--model", help="Base model that scores the rows."),
    diversity: float = typer.Option(0.7, "--diversity", help="Skip rows whose instruction has ROUGE-L F above this "
                                    "with a kept one."),
    as_json: bool = JsonOption,
):
    """Keep the best n rows by Instruction-Following Difficulty with the base model, diverse."""
    from .datagen.selection import SelectOptions, select

    options = SelectOptions(n=n, diversity=diversity)
    _run(lambda: options.check() or _datagen_report(select(data, out_file, options, model=model), as_json))


@datagen_app.command("run")
def datagen_run(
    spec: str = typer.Argument(..., help="A YAML spec of one step: `step:` (self-instruct, evol, augment, dedup, "
                               "filter, select), `input:`, `out:` and that step's options by their option names."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a spec key, e.g. --set n=50 (repeatable)."),
    as_json: bool = JsonOption,
):
    """Run one datagen step from a YAML spec, validated like a recipe."""
    from .datagen.spec import run_spec

    _run(lambda: _datagen_report(run_spec(spec, set_ or []), as_json))


# ---- report and doctor ------------------------------------------------------------------------
@app.command()
def report(
    run: str = typer.Argument(..., help="A run folder (the output_dir of `tunesmith train`) or a `tunesmith merge` folder."),
    open_: bool = typer.Option(False, "--open", help="Open the report in the default web browser."),
):
    """Write RUN/report.html: curves, data, before/after answers, forgetting, config and the doctor's findings
    (for a merge folder: its spec and per-task scores)."""
    from .reporting import write_report
    from .reporting.build import is_merge_folder
    from .rundir import load_run_config

    def go():
        if not is_merge_folder(Path(run)):
            load_run_config(run)  # a clear error for a folder that is neither a run nor a merge
        return write_report(run)

    path = _run(go)
    out.print(f"wrote {path}")
    if open_:
        import webbrowser

        webbrowser.open(path.resolve().as_uri())


@app.command()
def doctor(
    run: str = typer.Argument(..., help="A finished or crashed run folder."),
    as_json: bool = JsonOption,
):
    """Every finding of the training doctor for a run: NaN or diverging loss, flat loss, exploding gradients,
    overfitting, answers that never stop; each with its likely cause and the remedy."""
    from .doctor.run import diagnose

    findings = _run(lambda: diagnose(run))
    if as_json:
        return _print_json([f.as_dict() for f in findings])
    if not findings:
        out.print(f"{run}: no findings")
    for f in findings:
        out.print(f.text(), highlight=False, markup=False)


def main():
    """The `tunesmith` script: restarted once with jemalloc preloaded where the system has it (allocator.py)."""
    restart_with_allocator("tunesmith")
    app(prog_name="tunesmith")


if __name__ == "__main__":
    main()
