"""How cost grows: tokens/s and peak RSS of tunesmith and TRL (checkpointing on and off) as the sequence and the
model grow, the README's growth table and `docs/growth.svg`.

Each point is `bench/sft_throughput.py`'s workload (LoRA r=16 on all seven projections, lr 2e-4 cosine, bf16 where
the CPU has AMX, `--steps` optimizer steps of micro batch 1 x accumulation 4) with the booking task's inputs
repeated to about SEQ tokens per example, on the built-in SmolLM2-135M or a randomly initialised ~0.5B Llama.
Every run is its own process; the contenders alternate within a point. A run that fails (out of memory) is
reported as failed, not dropped.

    .venv/bin/python bench/growth.py --reps 2 --svg docs/growth.svg --json growth.json
    .venv/bin/python bench/growth.py --points builtin:256 --steps 1 --reps 1     # a smoke run
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from sft_throughput import base_contenders, mean_rendered_length, run, workload_env  # noqa: E402

from tunesmith.reporting.svg import HEIGHT, WIDTH, line_chart  # noqa: E402

DEFAULT_POINTS = "builtin:256,builtin:1024,builtin:4096,llama-0.5b:256,llama-0.5b:1024,llama-0.5b:4096"
NAMES = {"builtin": "SmolLM2-135M", "llama-0.5b": "Llama ~0.5B (random)"}
SHORT = {"builtin": "135M", "llama-0.5b": "0.5B"}
CONTENDERS = ("tunesmith", "trl", "trl-no-ckpt")
LABELS = {"tunesmith": "tunesmith", "trl": "TRL ckpt", "trl-no-ckpt": "TRL no-ckpt"}


def parse_points(text: str) -> list[tuple[str, int]]:
    points = []
    for item in text.split(","):
        shape, _, seq = item.partition(":")
        if shape not in NAMES or not seq.isdigit():
            raise SystemExit(f"--points: '{item}' is not SHAPE:SEQ with SHAPE one of {', '.join(NAMES)}")
        points.append((shape, int(seq)))
    return points


def measure(shape: str, seq_len: int, steps: int, reps: int) -> dict:
    """Every contender `reps` times at one point, alternating; a failed run is {'failed': reason}. Also the mean
    tokens per example of the data the point ran on."""
    work = workload_env(argparse.Namespace(seq_len=seq_len, shape=shape, steps=steps, micro=1, accum=4))
    setups, _, _ = base_contenders(work)
    results: dict[str, list[dict]] = {name: [] for name in setups}
    for rep in range(reps):
        for name in CONTENDERS if rep % 2 == 0 else reversed(CONTENDERS):
            code, extra, env = setups[name]
            try:
                r = run(code, steps, extra, env)
            except RuntimeError as e:
                r = {"failed": (str(e).strip().splitlines() or ["killed (out of memory?)"])[-1][:200]}
            results[name].append(r)
            shown = r.get("failed") or f"{r['tokens_per_second']:7.1f} tok/s  peak RSS {r['peak_rss_mib']:7.0f} MiB"
            print(f"{shape}:{seq_len} rep {rep} {name:12s} {shown}", flush=True)
    return {"shape": shape, "seq_len": seq_len, "tokens_per_example": mean_rendered_length(work["BENCH_DATA"]),
            "results": results}


def median(rs: list[dict], key: str) -> float | None:
    values = [r[key] for r in rs if key in r]
    return statistics.median(values) if values else None


def table(rows: list[dict]) -> str:
    head = ("| model | tokens per example (mean) | tunesmith tok/s | TRL ckpt tok/s | TRL no-ckpt tok/s | tunesmith MiB | "
            "TRL ckpt MiB | TRL no-ckpt MiB | speed / TRL fastest | memory / TRL leanest |\n" + "| --- " * 2 + "| ---: " * 8 + "|")
    lines = [head]
    for row in rows:
        tps = [median(row["results"][c], "tokens_per_second") for c in CONTENDERS]
        rss = [median(row["results"][c], "peak_rss_mib") for c in CONTENDERS]
        cell = lambda v, f: "failed" if v is None else format(v, f)  # noqa: E731
        fastest = max((v for v in tps[1:] if v), default=None)
        leanest = min((v for v in rss[1:] if v), default=None)
        speed = f"{tps[0] / fastest:.2f}x" if tps[0] and fastest else "-"
        memory = f"{rss[0] / leanest:.2f}x" if rss[0] and leanest else "-"
        lines.append(f"| {NAMES[row['shape']]} | {row['tokens_per_example']:,.0f} | " + " | ".join(cell(v, ".1f") for v in tps) + " | "
                     + " | ".join(cell(v, ",.0f") for v in rss) + f" | {speed} | {memory} |")
    return "\n".join(lines)


def plot(rows: list[dict]) -> str:
    """One standalone SVG: per model shape, tokens/s and peak RSS against log2 of the tokens per example."""
    charts = []
    for shape in dict.fromkeys(row["shape"] for row in rows):
        mine = [row for row in rows if row["shape"] == shape]
        for key, what in (("tokens_per_second", "tokens/s"), ("peak_rss_mib", "peak MiB")):
            series = {LABELS[c]: [(math.log2(row["tokens_per_example"]), median(row["results"][c], key)) for row in mine
                                  if median(row["results"][c], key) is not None] for c in CONTENDERS}
            charts.append(line_chart(f"{SHORT[shape]}: {what}", series, x_label="log2 tokens per example (8: 256, 12: 4096)"))
    style = ("svg.plot text{font:11px sans-serif}svg.plot text:not(.legend){fill:#333}svg.plot .title{font-weight:600}"
             "svg.plot .axis{stroke:#333}svg.plot .grid{stroke:#ddd}svg.plot path.series{fill:none;stroke-width:1.5}")
    columns = 2
    placed = [chart.replace("<svg ", f'<svg x="{(i % columns) * WIDTH}" y="{(i // columns) * HEIGHT}" ', 1)
              for i, chart in enumerate(charts)]
    rows_of_charts = (len(charts) + columns - 1) // columns
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {columns * WIDTH} {rows_of_charts * HEIGHT}" '
            f'width="{columns * WIDTH}" height="{rows_of_charts * HEIGHT}"><style>{style}</style>'
            f'<rect width="100%" height="100%" fill="#fff"/>{"".join(placed)}</svg>\n')


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--points", default=DEFAULT_POINTS, help="Comma-separated SHAPE:SEQ (shapes: builtin, llama-0.5b).")
    p.add_argument("--steps", type=int, default=2, help="Optimizer steps per run (each 4 examples).")
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--json", help="Write every run's numbers here; points already in it are kept, not rerun.")
    p.add_argument("--svg", help="Write the plot here.")
    args = p.parse_args()
    rows = json.loads(Path(args.json).read_text()) if args.json and Path(args.json).is_file() else []
    done = {(row["shape"], row["seq_len"]) for row in rows}
    for shape, seq_len in parse_points(args.points):
        if (shape, seq_len) in done:
            continue
        rows.append(measure(shape, seq_len, args.steps, args.reps))
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
    rows.sort(key=lambda row: (list(NAMES).index(row["shape"]), row["seq_len"]))
    print("\n" + table(rows))
    if args.svg:
        Path(args.svg).write_text(plot(rows))
        print(f"plot: {args.svg}")


if __name__ == "__main__":
    main()
