"""Training on several processes, GPUs or machines, with the engines users already run: torchrun and the
transformers Trainer (DDP, FSDP, DeepSpeed ZeRO). Nothing here moves a tensor between processes.

`tunesmith train RECIPE --nproc N` is the launcher: it checks the recipe and the output folder once, then
runs `python -m torch.distributed.run ... -m tunesmith train RECIPE ...` (the `tunesmith` command line
again) and waits. In each worker the Trainer reads torchrun's environment and wraps the model as the
recipe's `distributed` section says; only rank 0 writes the run folder and prints.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Iterable, Optional

from ..errors import TunesmithError

CHECKED_ENV = "TUNESMITH_OUTPUT_CHECKED"  # set by the launcher: its workers do not check the output folder again
LAUNCH_OPTIONS = ("nproc", "nnodes", "node_rank", "master_addr", "master_port")  # the `train` options not passed on
DEFAULT_PORT = 29500  # torchrun's


def world_size() -> int:
    """Processes in the run, as torchrun (or accelerate launch) tells each worker; 1 outside one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0 of the whole run: the one process that writes the run folder and prints."""
    return int(os.environ.get("RANK", "0")) == 0


def output_checked() -> bool:
    """Did `tunesmith train --nproc` check the output folder before starting this worker?"""
    return os.environ.get(CHECKED_ENV) == "1"


@dataclass
class Launch:
    """The `train` options that decide how many processes run where (torchrun's own names and meanings)."""

    nproc: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: Optional[str] = None
    master_port: Optional[int] = None

    @property
    def wanted(self) -> bool:
        """Anything but one process on one machine (a bad count too: validate() names it)."""
        return self.nproc != 1 or self.nnodes != 1 or self.node_rank != 0

    def validate(self) -> "Launch":
        if self.nproc < 1:
            raise TunesmithError(f"--nproc {self.nproc}: give the processes per machine, 1 or more (one per GPU)")
        if self.nnodes < 1:
            raise TunesmithError(f"--nnodes {self.nnodes}: give the number of machines, 1 or more")
        if not 0 <= self.node_rank < self.nnodes:
            raise TunesmithError(f"--node-rank {self.node_rank}: use 0 to {self.nnodes - 1} (0 on the machine at --master-addr)")
        if self.nnodes > 1 and not self.master_addr:
            raise TunesmithError("--nnodes > 1 needs --master-addr: the address of the machine started with --node-rank 0, "
                                 "the same on every machine")
        if self.master_port is not None and not 0 < self.master_port < 65536:
            raise TunesmithError(f"--master-port {self.master_port}: use a free TCP port, 1 to 65535")
        return self

    def torchrun_command(self, argv: list[str]) -> list[str]:
        """torchrun running `argv` (a `tunesmith` command line) in `nproc` workers; on one machine without a
        port it picks a free one (--standalone), so two runs on one machine do not collide."""
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={self.nproc}"]
        if self.nnodes == 1 and self.master_port is None:
            cmd.append("--standalone")
        else:
            cmd += [f"--nnodes={self.nnodes}", f"--node_rank={self.node_rank}",
                    f"--master_addr={self.master_addr or '127.0.0.1'}", f"--master_port={self.master_port or DEFAULT_PORT}"]
        return cmd + ["-m", "tunesmith", *argv]


def launch(spec: Launch, argv: list[str]) -> int:
    """Run `argv` under torchrun and return its exit code (the first failing worker's)."""
    env = {**os.environ, CHECKED_ENV: "1"}
    return subprocess.run(spec.torchrun_command(argv), env=env).returncode


def worker_argv(ctx, skip: Iterable[str] = LAUNCH_OPTIONS) -> list[str]:
    """This command line rebuilt from click's parsed parameters, without the launch options: options added
    to `train` later travel to the workers without a change here."""
    skip = set(skip)
    positional: list[str] = []
    options: list[str] = []
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if param.name in skip or value is None or value == param.default:
            continue
        if param.param_type_name == "argument":
            positional += [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
        elif getattr(param, "is_flag", False):
            names = param.opts if value else param.secondary_opts
            options.append(names[0])
        elif getattr(param, "multiple", False):
            for v in value:
                options += [param.opts[0], str(v)]
        else:
            options += [param.opts[0], str(value)]
    return [ctx.info_name, *positional, *options]


def shards_weights(config) -> bool:
    """Are the weights split across the processes of this run (FSDP, DeepSpeed), so that saving them is a
    collective step the Trainer does, not a file rank 0 writes alone?"""
    return world_size() > 1 and config.distributed.strategy != "ddp"


def check_strategy(config) -> None:
    """Refuse, before any worker starts, a strategy that would not run here: transformers hands FSDP and
    DeepSpeed to accelerate only on GPUs (on CPU it would quietly fall back to DDP), and DeepSpeed must be
    installed."""
    import torch

    strategy = config.distributed.strategy
    if strategy != "ddp" and not torch.cuda.is_available():
        raise TunesmithError(f"distributed.strategy: {strategy} shards the model over GPUs and this machine has none; "
                             "use strategy: ddp on CPU")
    if strategy == "deepspeed":
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise TunesmithError("distributed.strategy: deepspeed needs the deepspeed package (pip install deepspeed), "
                                 "or use strategy: fsdp, which comes with torch") from None


def training_arguments(config) -> dict:
    """TrainingArguments for the recipe's strategy; none outside a multi-process run.

    DDP: frozen base weights get no gradient, so the Trainer's default search for unused parameters would
    only cost time (and errors for some PEFT models); it is off. FSDP: FSDP2 with full sharding at ZeRO-3
    (weights re-sharded after each forward) or gradient and optimizer sharding at ZeRO-2, a full state
    dict at save time so the adapter is one ordinary file. DeepSpeed: a ZeRO config whose batch, clipping
    and precision entries are "auto", so the Trainer fills them from the recipe.
    """
    if world_size() <= 1:
        return {}
    d = config.distributed
    if d.strategy == "ddp":
        return {"ddp_find_unused_parameters": False}
    if d.strategy == "fsdp":
        return {"fsdp": True, "fsdp_config": {"version": 2, "reshard_after_forward": d.zero_stage == 3,
                                              "cpu_offload": d.offload, "state_dict_type": "FULL_STATE_DICT"}}
    return {"deepspeed": deepspeed_config(d.zero_stage, d.offload)}


def deepspeed_config(stage: int, offload: bool) -> dict:
    """A DeepSpeed ZeRO-2 or ZeRO-3 config; the "auto" entries come from TrainingArguments."""
    zero: dict = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "zero_optimization": zero,
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
    }
