"""Where a LoRA DPO step spends its time: torch.profiler over a short run of bench/dpo_throughput.py's setup
(2 optimizer steps of micro batch 4 pairs x accumulation 4), the 40 ops with the most self CPU time. Extra
arguments are --set overrides, e.g. `train.fused_lora=false`.

    .venv/bin/python bench/profile_dpo_step.py
"""
import sys

from dpo_throughput import PAIRS_FILE, write_pairs  # this folder is on the path when the script runs

from tunesmith.quiet import quiet_libraries

quiet_libraries()
write_pairs(PAIRS_FILE)

from torch.profiler import ProfilerActivity, profile  # noqa: E402

from tunesmith.config import load_config  # noqa: E402
from tunesmith.training.run import train  # noqa: E402

cfg = load_config({"model": "smollm2-135m-instruct",
                   "data": {"train": PAIRS_FILE, "eval_split": 0.0, "max_length": 512},
                   "method": {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0},
                   "train": {"objective": "dpo", "max_steps": 2, "batch_size": 4, "grad_accum": 4, "lr": 5e-5,
                             "logging_steps": 1, "order": "sequential", "eval_each_epoch": False, "save_steps": 1000},
                   "preference": {"beta": 0.1}, "output_dir": "/tmp/bench-profile-dpo"}, list(sys.argv[1:]))
with profile(activities=[ProfilerActivity.CPU]) as prof:
    summary = train(cfg, overwrite=True, progress=False).summary
print(f"{summary['tokens_per_second']} tokens/s under the profiler, {summary['train_seconds']} s")
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
