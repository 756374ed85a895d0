"""What a second torch process costs a training run on a small CPU, and which threading settings fix it.

    .venv/bin/python bench/cpu_sharing.py --steps 4

Each case trains the built-in model on the quickstart recipe (micro batch 4, `--steps` optimizer steps,
fp32) in its own process, alone or as two identical processes started together, under one OpenMP
setting (torch's default always runs, as the reference): torch's default (libgomp's threads spin 300,000
times while they wait for work; `GOMP_SPINCOUNT=300000` stands for it, since tunesmith sets its own default
when imported), tunesmith's default (`GOMP_SPINCOUNT=1000`: spin briefly, then sleep),
`OMP_WAIT_POLICY=PASSIVE` (waiting threads sleep at once), and `train.num_threads` = half the cores (no
oversubscription); `--cases` also takes any `VARIABLE=VALUE`. Prints seconds per step for each process
and each case's ratio to torch's default. `--alone-reps N` measures lone runs only,
settings alternating, N times each: what a setting costs a run that has the machine to itself.
Run it alone: another process on the machine is exactly what it measures.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys
from tunesmith.quiet import quiet_libraries
quiet_libraries()
from tunesmith.config import load_config
from tunesmith.training.run import train
steps, out, threads = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
cfg = load_config("recipes/quickstart.yaml", [f"train.max_steps={steps}", "train.batch_size=4", "train.bf16=false",
                  "train.save_steps=1000", "data.eval=null", f"train.num_threads={threads}", f"output_dir={out}"])
s = train(cfg, progress=False).summary
print("RESULT " + json.dumps({"seconds_per_step": s["train_seconds"] / s["steps"]}))
"""

def case(name: str) -> tuple[dict, int]:
    """A named setting, or any `VARIABLE=VALUE` for the environment (e.g. `GOMP_SPINCOUNT=3000`)."""
    if name in CASES:
        return CASES[name]
    key, _, value = name.partition("=")
    if not value:
        raise SystemExit(f"--cases {name!r}: use one of {list(CASES)} or VARIABLE=VALUE")
    return {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": None, key: value}, 0


CASES = {
    "torch default": ({"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": "300000"}, 0),
    "tunesmith default": ({"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": None}, 0),
    "OMP_WAIT_POLICY=PASSIVE": ({"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0"}, 0),
    "num_threads = cores / 2": ({"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": "300000"}, -1),
}


def start(steps: int, env_changes: dict, threads: int, work: str) -> subprocess.Popen:
    env = dict(os.environ)
    for k, v in env_changes.items():
        env.pop(k, None) if v is None else env.__setitem__(k, v)
    out = tempfile.mkdtemp(dir=work)
    os.rmdir(out)
    return subprocess.Popen([sys.executable, "-c", CHILD, str(steps), out, str(threads)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> float:
    stdout, stderr = proc.communicate()
    lines = [l for l in stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"a training process failed:\n{stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])["seconds_per_step"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--cases", nargs="*", help=f"only these settings: any of {list(CASES)} or VARIABLE=VALUE (default: the named ones)")
    p.add_argument("--alone-reps", type=int, default=0,
                   help="instead: N alternating lone runs of each chosen setting, medians (what a lone run pays)")
    args = p.parse_args()
    if args.alone_reps:
        return lone_cost(args)
    cores = os.cpu_count() or 1
    work = tempfile.mkdtemp(prefix="tunesmith-cpu-sharing-")
    rows = []
    for name in ["torch default"] + [n for n in (args.cases or CASES) if n != "torch default"]:
        env, threads = case(name)
        threads = max(1, cores // 2) if threads == -1 else threads
        alone = finish(start(args.steps, env, threads, work))
        pair = [start(args.steps, env, threads, work) for _ in range(2)]
        together = [finish(proc) for proc in pair]
        rows.append((name, alone, together))
        print(f"{name}: alone {alone:.2f} s/step, two at once {together[0]:.2f} / {together[1]:.2f} s/step", flush=True)
    base = rows[0][1]
    print(f"\n{cores} cores, {args.steps} steps of micro batch 4 on the built-in model, fp32")
    print("| setting | alone (s/step) | two at once (s/step, each) | alone vs default alone | two at once vs alone |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, alone, together in rows:
        worst = max(together)
        print(f"| {name} | {alone:.2f} | {together[0]:.2f} / {together[1]:.2f} | {alone / base:.2f}x | {worst / alone:.1f}x |")


def lone_cost(args) -> None:
    """Lone runs only, settings alternating, so slow drift of the machine hits every setting alike."""
    import statistics

    work = tempfile.mkdtemp(prefix="tunesmith-cpu-sharing-")
    names = ["torch default"] + [n for n in (args.cases or CASES) if n != "torch default"]
    times = {n: [] for n in names}
    for _ in range(args.alone_reps):
        for n in names:
            env, threads = case(n)
            times[n].append(finish(start(args.steps, env, max(1, (os.cpu_count() or 1) // 2) if threads == -1 else threads, work)))
    base = statistics.median(times["torch default"])
    print(f"| setting (alone, median of {args.alone_reps}) | s/step | vs torch default |\n| --- | ---: | ---: |")
    for n in names:
        m = statistics.median(times[n])
        print(f"| {n} | {m:.2f} | {m / base:.3f}x |")


if __name__ == "__main__":
    main()
