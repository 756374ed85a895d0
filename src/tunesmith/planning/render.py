"""Tables for people: the bill, the recommendation, and predicted-vs-measured (the CLI prints these)."""
from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..objectives import DEFAULT_OBJECTIVE
from ..sizes import fmt_bytes
from .bill import Bill


def print_bill(console: Console, bill: Bill, explain: bool = False) -> None:
    s = bill.setup
    title = (f"{bill.model}: {bill.method}, {bill.total_params:,} parameters; micro batch {s['batch']} x "
             f"{s['seq_len']} tokens, grad_accum {s['grad_accum']}, {s['precision']}"
             + (", checkpointing" if s["checkpointing"] else "")
             + (f", objective {s['objective']} (pairs of two sequences)" if s.get("objective") != DEFAULT_OBJECTIVE else "")
             + (f", {s['devices']} devices ZeRO-{s['zero']}" if s["devices"] > 1 else "")
             + f", {s['device']}")
    table = Table(title=escape(title), title_justify="left", show_lines=True)
    table.add_column("line", ratio=1)
    table.add_column("memory", justify="right", no_wrap=True)
    table.add_column("formula (assumes)", ratio=3)
    for line in bill.lines:
        formula = escape(line.formula) + f"\n[dim]({escape(line.assumes)})[/]"
        if explain:
            formula += f"\n[italic]{escape(line.why)}[/]"
        mem = "" if line.key == "trainable" else fmt_bytes(line.bytes)
        table.add_row(escape(line.label), mem, formula)
    console.print(table)
    phases = Table("moment of the step", "memory", title="the peak is the largest moment, not the sum of the lines",
                   title_justify="left")
    for name, value in sorted(bill.phases.items(), key=lambda kv: -kv[1]):
        phases.add_row(name + ("  <- peak" if name == bill.peak_phase else ""), fmt_bytes(value))
    console.print(phases)
    verdict = ""
    if bill.budget is not None:
        verdict = (f"  [green]fits[/] in {fmt_bytes(bill.budget)}" if bill.fits
                   else f"  [red]does not fit[/]: {fmt_bytes(bill.total)} > {fmt_bytes(bill.budget)}")
    console.print(f"[bold]total {fmt_bytes(bill.total)}[/] (peak at {bill.peak_phase} + runtime overhead){verdict}",
                  highlight=False)
    for note in bill.notes:
        console.print(f"[dim]note:[/] {escape(note)}", highlight=False)


def print_recommendation(console: Console, rec) -> None:
    table = Table("option", "fits", "memory", "why", title=f"{rec.model} in {fmt_bytes(rec.budget)} "
                  f"({rec.headroom:.0%} kept as headroom)", title_justify="left")
    for o in rec.options:
        mark = "[green]chosen[/]" if rec.chosen is o else ("yes" if o.fits else "[red]no[/]")
        table.add_row(o.label, mark, fmt_bytes(o.bill.total) if o.bill else "-", escape(o.reason))
    console.print(table)
    if rec.chosen is None:
        console.print("[red]nothing fits[/]: shorten the sequences (--seq-len), add devices (--devices N --zero 3), "
                      "or take a smaller model", highlight=False)
        return
    console.print(rec.yaml, highlight=False, markup=False)


def print_measurement(console: Console, m) -> None:
    table = Table("model", "method", "tokens", "predicted", "measured", "error", "s/step", "how",
                  title="predicted vs measured peak memory", title_justify="left")
    method = m.method if m.objective == DEFAULT_OBJECTIVE else f"{m.method} {m.objective} (pairs)"
    table.add_row(m.model, method, f"{m.batch} x {m.seq_len}", fmt_bytes(m.predicted), fmt_bytes(m.measured),
                  f"{m.error:+.1%}", f"{m.seconds_per_step:.2f}", m.how)
    console.print(table)
    for note in m.notes:
        console.print(f"[dim]note:[/] {note}", highlight=False)


__all__ = ["print_bill", "print_recommendation", "print_measurement"]
