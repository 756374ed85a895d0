"""Scale-out (issue 13, section 4): `tunesmith train --nproc N` runs under torchrun; on this CPU (gloo) two
processes give the adapter one process gives on the same global batch and data order, with the fast path on.

The reference run is one process with grad_accum 2 at the same micro batch: with `order: sequential` its
micro batches are exactly the batches torchrun's two ranks get (rank 0 the first, rank 1 the second).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from helpers import fails, invoke, ok, write_jsonl
from tunesmith.config import load_config
from tunesmith.errors import TunesmithError

ADAPTER = "adapter_model.safetensors"
FAST_PATH = {"padding_free": True, "selective_loss": True, "fused_lora": True}


def _recipe(folder: Path, model: Path, rows: list[dict], batch: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / "train.jsonl", rows)
    recipe = {
        "model": str(model),
        "data": {"train": "train.jsonl", "eval_split": 0.0, "max_length": 256},
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"max_steps": 2, "batch_size": batch, "lr": 1e-3, "logging_steps": 1, "save_steps": 100,
                  "bf16": False, "order": "sequential", "warmup": 0, **FAST_PATH},
        "output_dir": str(folder / "run"),
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def _one_process(recipe: Path, out: Path) -> Path:
    ok(invoke("train", recipe, "--set", "train.grad_accum=2", "--output-dir", out, "--json"))
    return out


def _tunesmith(*args) -> subprocess.Popen:
    """`tunesmith ARGS` in a new process, as a user starts it; one thread per process (2 cores here)."""
    return subprocess.Popen([sys.executable, "-m", "tunesmith", *map(str, args)],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _finished(command: subprocess.Popen) -> str:
    stdout, stderr = command.communicate(timeout=600)
    assert command.returncode == 0, stderr[-3000:]
    return stdout


def _torchrun(recipe: Path, *args) -> str:
    """`tunesmith train RECIPE --json ARGS`: the launcher and the torchrun workers it starts; what they print."""
    return _finished(_tunesmith("train", recipe, "--json", *args))


def _steps(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def _same_run(one: Path, two: Path) -> None:
    """Same adapter (1e-5), and the same logged loss and gradient norm at every step (the normaliser's scale)."""
    a, b = load_file(one / ADAPTER), load_file(two / ADAPTER)
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max().item() < 1e-5, k
    s1, s2 = _steps(one), _steps(two)
    assert [r["step"] for r in s2] == [1, 2]  # rank 0 alone wrote metrics.jsonl: each step once
    for r1, r2 in zip(s1, s2):
        assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-5)
        assert r2["grad_norm"] == pytest.approx(r1["grad_norm"], rel=1e-5)


@pytest.fixture(scope="module")
def booking(tmp_path_factory, tiny_model_dir):
    """A recipe on booking data (micro batch 2) and its one-process reference run."""
    from tunesmith.demo.booking import generate

    folder = tmp_path_factory.mktemp("ddp-booking")
    recipe = _recipe(folder, tiny_model_dir, generate(n_train=16, n_eval=2, seed=1)[0], batch=2)
    return recipe, _one_process(recipe, folder / "one")


@pytest.mark.slow
def test_two_processes_train_the_adapter_one_process_trains(booking, tmp_path):
    recipe, one = booking
    two = tmp_path / "two"
    printed = _torchrun(recipe, "--nproc", "2", "--output-dir", two)
    assert json.loads(printed)["steps"] == 2  # one JSON summary: only rank 0 prints
    _same_run(one, two)


@pytest.mark.slow
def test_unequal_supervised_tokens_per_rank_are_normalised_globally(tmp_path, tiny_model_dir):
    """Batch 1: rank 0 gets examples 0 and 2 (long answers), rank 1 examples 1 and 3 (one word). A per-rank
    normaliser would weight rank 1's few tokens like rank 0's many; the global one weights every token alike."""
    long, short = " ".join(f"word{i}" for i in range(60)), "ok"
    rows = [{"messages": [{"role": "user", "content": f"question {i}"},
                          {"role": "assistant", "content": long if i % 2 == 0 else short}]} for i in range(4)]
    recipe = _recipe(tmp_path / "unequal", tiny_model_dir, rows, batch=1)
    one = _one_process(recipe, tmp_path / "one")
    two = tmp_path / "two"
    _torchrun(recipe, "--nproc", "2", "--output-dir", two)
    _same_run(one, two)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_on_one_machine(booking, tmp_path):
    """Two `tunesmith train --nnodes 2` commands, node ranks 0 and 1, one process each, meet at 127.0.0.1."""
    recipe, one = booking
    two = tmp_path / "two-nodes"
    port = _free_port()
    nodes = [_tunesmith("train", recipe, "--output-dir", two, "--nnodes", 2, "--node-rank", rank,
                        "--master-addr", "127.0.0.1", "--master-port", port) for rank in (0, 1)]
    printed = [_finished(node) for node in nodes]
    assert "saved to" in printed[0] and "saved to" not in printed[1]  # global rank 0 reports
    _same_run(one, two)


@pytest.mark.slow
@pytest.mark.skipif(not __import__("torch").cuda.device_count() >= 2, reason="FSDP runs on GPUs only (transformers "
                    "hands it to accelerate on CUDA); this needs 2")
def test_fsdp_on_two_gpus_matches_one_process(booking, tmp_path):
    recipe, one = booking
    two = tmp_path / "fsdp"
    _torchrun(recipe, "--nproc", "2", "--output-dir", two, "--set", "distributed.strategy=fsdp")
    a, b = load_file(one / ADAPTER), load_file(two / ADAPTER)
    for k in a:
        assert (a[k] - b[k].to(a[k].dtype).cpu()).abs().max().item() < 1e-4, k


# ---- the launcher and the recipe section, without starting workers -----------------------------------
@pytest.fixture
def recipe_file(tmp_path, tiny_recipe) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe), encoding="utf-8")
    return path


@pytest.fixture
def launched(monkeypatch):
    """Replaces starting torchrun: records what the workers would run."""
    from tunesmith.training import distributed

    calls = []
    monkeypatch.setattr(distributed, "launch", lambda spec, argv: calls.append((spec, argv)) or 0)
    return calls


def test_workers_run_the_same_command_without_the_launch_options(recipe_file, launched):
    ok(invoke("train", recipe_file, "--set", "train.lr=0.001", "--max-steps", "3", "--overwrite", "--nproc", "2",
              "--master-port", "29611"))
    (spec, argv), = launched
    assert argv == ["train", str(recipe_file), "--set", "train.lr=0.001", "--max-steps", "3", "--overwrite"]
    assert (spec.nproc, spec.nnodes, spec.master_port) == (2, 1, 29611)


def test_torchrun_command_for_one_and_for_several_machines():
    from tunesmith.training.distributed import Launch

    one = Launch(nproc=8).torchrun_command(["train", "r.yaml"])
    assert one[1:] == ["-m", "torch.distributed.run", "--nproc_per_node=8", "--standalone",
                       "-m", "tunesmith", "train", "r.yaml"]
    two = Launch(nproc=8, nnodes=2, node_rank=1, master_addr="10.0.0.1").torchrun_command(["train", "r.yaml"])
    assert two[1:8] == ["-m", "torch.distributed.run", "--nproc_per_node=8", "--nnodes=2", "--node_rank=1",
                        "--master_addr=10.0.0.1", "--master_port=29500"]


@pytest.mark.parametrize("args, fragment", [
    (["--nproc", "0"], "--nproc 0"),
    (["--nnodes", "2"], "--master-addr"),
    (["--nnodes", "2", "--node-rank", "2", "--master-addr", "127.0.0.1"], "--node-rank 2: use 0 to 1"),
    (["--nproc", "2", "--master-port", "70000"], "--master-port 70000"),
])
def test_bad_launch_options_fail_in_one_line(recipe_file, launched, args, fragment):
    fails(invoke("train", recipe_file, *args), fragment)
    assert launched == []


def test_the_output_folder_is_checked_before_any_worker_starts(recipe_file, tiny_recipe, launched):
    out = Path(tiny_recipe["output_dir"])
    out.mkdir()
    (out / "keep.txt").write_text("earlier work")
    fails(invoke("train", recipe_file, "--nproc", "2"), "already exists and is not empty")
    assert launched == [] and (out / "keep.txt").read_text() == "earlier work"


def test_sharding_strategies_need_gpus(recipe_file, launched):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    fails(invoke("train", recipe_file, "--nproc", "2", "--set", "distributed.strategy=fsdp"),
          "distributed.strategy: fsdp", "use strategy: ddp on CPU")
    assert launched == []


def test_strategy_maps_to_training_arguments(tiny_recipe, monkeypatch):
    from tunesmith.training.distributed import training_arguments

    def args(**distributed):
        return training_arguments(load_config({**tiny_recipe, "distributed": distributed}))

    assert args() == {}  # one process: nothing to distribute
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert args() == {"ddp_find_unused_parameters": False}
    assert args(strategy="fsdp", zero_stage=2) == {"fsdp": True, "fsdp_config": {
        "version": 2, "reshard_after_forward": False, "cpu_offload": False, "state_dict_type": "FULL_STATE_DICT"}}
    zero3 = args(strategy="deepspeed", offload=True)["deepspeed"]
    assert zero3["zero_optimization"]["stage"] == 3
    assert zero3["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert zero3["train_micro_batch_size_per_gpu"] == "auto"


def test_sharding_options_with_ddp_are_refused(tiny_recipe):
    with pytest.raises(TunesmithError, match=r"distributed\.zero_stage applies to strategy fsdp or deepspeed"):
        load_config({**tiny_recipe, "distributed": {"zero_stage": 2}})
