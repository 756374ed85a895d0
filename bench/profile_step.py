"""Where a default training step spends its time: torch.profiler over a short quickstart run (2 optimizer steps
of micro batch 4 x accumulation 4), the 40 ops with the most self CPU time. Extra arguments are --set
overrides, e.g. `train.fused_lora=false`.

    .venv/bin/python bench/profile_step.py
"""
import sys

from tunesmith.quiet import quiet_libraries

quiet_libraries()

from torch.profiler import ProfilerActivity, profile  # noqa: E402

from tunesmith.config import load_config  # noqa: E402
from tunesmith.training.run import train  # noqa: E402

cfg = load_config("recipes/quickstart.yaml", ["train.max_steps=2", "train.batch_size=4", "train.grad_accum=4",
                  "output_dir=/tmp/bench-profile-step", "train.eval_each_epoch=false", "train.order=sequential",
                  "train.save_steps=1000", *sys.argv[1:]])
cfg.data.eval = None
cfg.data.eval_split = 0.0
with profile(activities=[ProfilerActivity.CPU]) as prof:
    summary = train(cfg, overwrite=True, progress=False).summary
print(f"{summary['tokens_per_second']} tokens/s under the profiler, {summary['train_seconds']} s")
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
