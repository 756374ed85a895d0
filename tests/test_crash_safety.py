"""Crash safety: a run killed at any step resumes to the uninterrupted run's adapter; SIGINT/SIGTERM save a
checkpoint and print the resume command; checkpoints appear whole or not at all; --resume refuses a changed
config unless --force.

The signal tests run `tunesmith train` in a subprocess through a small launcher that slows each step down
(so a signal lands in the middle of a run, not after it) and otherwise runs the real CLI.
"""
from __future__ import annotations

import errno
import hashlib
import inspect
import json
import logging
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from tunesmith.config import load_config
from tunesmith.rundir import resume_checkpoint
from tunesmith.training.run import train

from helpers import fails, invoke, ok, tree
from test_train import small_recipe

MAX_STEPS, SAVE_STEPS = 8, 2
ADAPTER = "adapter_model.safetensors"

# Runs the real CLI with every training step slowed by STEP_SECONDS (the test's only change to it).
SLOW_CLI = """
import sys, time
from transformers import TrainerCallback
from tunesmith.training import run

class Slow(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        time.sleep(STEP_SECONDS)

build = run.build_trainer
def slow_trainer(*a, **k):
    trainer = build(*a, **k)
    trainer.add_callback(Slow())
    return trainer

run.build_trainer = slow_trainer
sys.argv = ["tunesmith", *sys.argv[1:]]
from tunesmith.cli import main
main()
"""
STEP_SECONDS = 0.4


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir):
    """The uninterrupted run (in this process), and a recipe file with the same config for the subprocesses."""
    tmp = tmp_path_factory.mktemp("crash")
    recipe = small_recipe(tmp, tiny_model_dir, n_train=12, n_eval=0, max_steps=MAX_STEPS, save_steps=SAVE_STEPS)
    whole = train(load_config({**recipe, "output_dir": str(tmp / "whole")}), progress=False).output_dir
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    launcher = tmp / "slow_cli.py"
    launcher.write_text(SLOW_CLI.replace("STEP_SECONDS", repr(STEP_SECONDS)), encoding="utf-8")
    return {"whole": whole, "recipe": path, "launcher": launcher}


def _start(reference, *args) -> subprocess.Popen:
    # The same thread count as this process, so that the reductions (and the floats) are the same.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    return subprocess.Popen([sys.executable, str(reference["launcher"]), *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_step(proc: subprocess.Popen, run: Path, step: int, timeout: float = 120) -> None:
    """Poll metrics.jsonl until it logs `step` (the child is then in the middle of the next one)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the run ended before step {step}: {proc.communicate()}"
        if step in [r["step"] for r in _loss_rows(run)]:
            return
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"step {step} not logged within {timeout} s")


def _loss_rows(run: Path) -> list[dict]:
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            continue
    return [r for r in rows if "loss" in r]


def _assert_same_adapter(run: Path, whole: Path) -> None:
    a, b = load_file(Path(whole) / ADAPTER), load_file(Path(run) / ADAPTER)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


def _assert_each_step_once(run: Path) -> None:
    assert [r["step"] for r in _loss_rows(run)] == list(range(1, MAX_STEPS + 1))


# --- SIGKILL at a random step ---------------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_equals_uninterrupted(reference, tmp_path):
    step = random.Random(13).randint(SAVE_STEPS, MAX_STEPS - 2)
    run = tmp_path / "killed"
    proc = _start(reference, "train", reference["recipe"], "--output-dir", run)
    _wait_for_step(proc, run, step)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not (run / ADAPTER).exists(), "the run finished before it was killed"

    ok(invoke("train", reference["recipe"], "--output-dir", run, "--resume"))
    _assert_same_adapter(run, reference["whole"])
    _assert_each_step_once(run)


# --- SIGINT / SIGTERM -----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_a_checkpoint_and_prints_the_resume_command(reference, tmp_path, sig, code):
    """The run stops at the end of the step it is in, with a checkpoint of that step, one line naming it
    and the command (same --set and --output-dir, --resume); that command finishes the run as if it had
    never stopped."""
    run = tmp_path / "stopped"
    args = ["train", str(reference["recipe"]), "--set", "train.logging_steps=1", "--output-dir", str(run)]
    proc = _start(reference, *args)
    _wait_for_step(proc, run, 2)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr

    lines = [line for line in stderr.splitlines() if "resume with:" in line]
    assert len(lines) == 1, stderr
    stopped = max(r["step"] for r in _loss_rows(run))
    assert 2 <= stopped < MAX_STEPS
    command = shlex.join(["tunesmith", *args, "--resume"])
    assert lines[0] == (f"stopped by {signal.Signals(sig).name} at step {stopped}; checkpoint saved in "
                        f"{run / f'checkpoint-{stopped}'}; resume with: {command}")
    state = json.loads((run / f"checkpoint-{stopped}" / "trainer_state.json").read_text())
    assert state["global_step"] == stopped
    assert "Traceback" not in stderr

    ok(invoke(*shlex.split(command)[1:]))
    _assert_same_adapter(run, reference["whole"])
    _assert_each_step_once(run)


# --- checkpoints appear whole or not at all --------------------------------------------------------------


def _checkpoint(run: Path, step: int) -> Path:
    """A complete checkpoint folder, written by hand in the formats the Trainer uses."""
    ckpt = run / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    save_file({"w": torch.ones(4, 4) * step}, ckpt / ADAPTER)
    torch.save({"state": {0: torch.zeros(16)}}, ckpt / "optimizer.pt")
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return ckpt


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_half_written_checkpoints_are_never_chosen(tmp_path):
    """A newer folder without its trainer state, and a complete one under the temporary name, lose to the
    last complete checkpoint-N."""
    _checkpoint(tmp_path, 2)
    (tmp_path / "checkpoint-4").mkdir()
    save_file({"w": torch.ones(4, 4)}, tmp_path / "checkpoint-4" / ADAPTER)
    _checkpoint(tmp_path / ".checkpoint-6.partial", 6)
    assert resume_checkpoint(tmp_path) == tmp_path / "checkpoint-2"


@pytest.mark.parametrize("torn", [ADAPTER, "optimizer.pt", "trainer_state.json"])
def test_truncated_last_checkpoint_falls_back_with_a_warning(tmp_path, caplog, torn):
    _checkpoint(tmp_path, 2)
    _truncate(_checkpoint(tmp_path, 4) / torn)
    with caplog.at_level(logging.WARNING, logger="tunesmith"):
        assert resume_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    assert len(caplog.records) == 1
    assert str(tmp_path / "checkpoint-4") in caplog.text and torn in caplog.text


def test_the_save_hook_keeps_its_name_and_parameters():
    """AtomicCheckpoints overrides the private Trainer._save_checkpoint (see training/trainer.py)."""
    from transformers import Trainer

    hook = getattr(Trainer, "_save_checkpoint", None)
    assert hook is not None, "transformers renamed Trainer._save_checkpoint: update AtomicCheckpoints"
    assert list(inspect.signature(hook).parameters) == ["self", "model", "trial"]


def test_a_kill_while_saving_leaves_no_checkpoint_folder(tmp_path, tiny_model_dir, monkeypatch):
    """The save of step 4 dies after the weights and optimizer are written: checkpoint-4 does not exist,
    --resume picks checkpoint-2, and the resumed run clears the partial folder."""
    from transformers import Trainer

    class Killed(Exception):
        pass

    original = Trainer._save_rng_state

    def dies_at_step_4(self, output_dir):
        if self.state.global_step == 4:
            raise Killed
        return original(self, output_dir)

    config = load_config(small_recipe(tmp_path, tiny_model_dir, n_train=12, n_eval=0, max_steps=6, save_steps=2))
    run = Path(config.output_dir)
    with monkeypatch.context() as m:
        m.setattr(Trainer, "_save_rng_state", dies_at_step_4)
        with pytest.raises(Killed):
            train(config, progress=False)
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2"]
    assert (run / ".checkpoint-4.partial" / "checkpoint-4" / ADAPTER).is_file()  # where the save was going

    assert train(config, resume=True, progress=False).summary["steps"] == 6
    assert not list(run.glob(".checkpoint-*.partial"))
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]


def test_a_full_disk_while_saving_is_one_line_and_leaves_the_last_whole_checkpoint(tmp_path, tiny_model_dir,
                                                                                    monkeypatch):
    """torch.save on a full disk raises a RuntimeError with no errno ("iostream error"): the save of step 4
    fails that way with the disk reading full, and train ends in one line naming the disk and the fix, the
    partial folder gone, checkpoint-2 left for --resume, which then finishes the run."""
    from transformers import Trainer

    from tunesmith.training import disk

    original = Trainer._save_rng_state

    def full_at_step_4(self, output_dir):
        if self.state.global_step == 4:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 690203840 vs 690203728")
        return original(self, output_dir)

    recipe = small_recipe(tmp_path, tiny_model_dir, n_train=12, n_eval=0, max_steps=6, save_steps=2)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run = Path(recipe["output_dir"])
    before = inputs_of(path, tiny_model_dir)
    with monkeypatch.context() as m:
        m.setattr(Trainer, "_save_rng_state", full_at_step_4)
        m.setattr(disk, "FULL_DISK_BYTES", 2**62)  # whatever this disk has free reads as full
        fails(invoke("train", path, "--json"), f"no space left on the disk holding {run} while writing checkpoint-4",
              "MiB written before it ran out, removed", "lower train.save_total_limit", "--resume")
    assert inputs_of(path, tiny_model_dir) == before
    assert not list(run.glob(".checkpoint-*")) and sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2"]
    assert train(load_config(recipe), resume=True, progress=False).summary["steps"] == 6


def test_a_full_disk_while_writing_the_trained_weights_is_one_line(tmp_path, tiny_model_dir, monkeypatch):
    from tunesmith.training import run as training_run

    def no_space(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    recipe = small_recipe(tmp_path, tiny_model_dir, n_train=8, n_eval=0, max_steps=2, save_steps=2)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    monkeypatch.setattr(training_run, "_save_weights", no_space)
    before = inputs_of(path, tiny_model_dir)
    fails(invoke("train", path, "--json"), "no space left on the disk holding", "while writing the trained weights")
    assert inputs_of(path, tiny_model_dir) == before
    assert (Path(recipe["output_dir"]) / "checkpoint-2").is_dir()  # the finished run's state, for --resume


def inputs_of(recipe_path: Path, model_dir: Path) -> dict[str, str]:
    """Hashes of what a run reads: the recipe, its data files, the model folder."""
    data = yaml.safe_load(recipe_path.read_text())["data"]
    files = [recipe_path, *(Path(data[k]) for k in ("train", "eval") if k in data)]
    return {**tree(model_dir), **{str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}}


def test_a_failed_save_with_room_on_the_disk_is_not_called_full(tmp_path):
    """Only a full disk becomes a user error; any other failure of a save propagates unchanged."""
    from tunesmith.errors import TunesmithError
    from tunesmith.training.disk import full_disk_is_reported

    partial = tmp_path / ".checkpoint-4.partial"
    partial.mkdir()
    with pytest.raises(RuntimeError, match="boom"):
        with full_disk_is_reported(tmp_path, "checkpoint-4", partial=partial):
            raise RuntimeError("boom")
    assert partial.is_dir()  # kept for reading, and removed by the next save as before
    with pytest.raises(TunesmithError, match="while writing checkpoint-4"):
        with full_disk_is_reported(tmp_path, "checkpoint-4", partial=partial):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert not partial.exists()


# --- a changed config --------------------------------------------------------------------------------------


def test_resume_with_a_changed_config_is_refused_unless_force(tmp_path, tiny_model_dir):
    recipe = small_recipe(tmp_path, tiny_model_dir, n_train=12, n_eval=0, max_steps=2, save_steps=2)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    ok(invoke("train", path))

    stderr = fails(invoke("train", path, "--resume", "--max-steps", "3", "--set", "train.lr=0.002",
                          "--set", "method.r=8"), "--resume: the config differs", "--force")
    assert "train.lr (0.001 -> 0.002)" in stderr and "method.r (4 -> 8)" in stderr
    assert "train.max_steps (" not in stderr, "extending a run is not a change"
    assert json.loads((Path(recipe["output_dir"]) / "summary.json").read_text())["steps"] == 2

    ok(invoke("train", path, "--resume", "--max-steps", "3", "--set", "train.lr=0.002", "--force"))
    assert json.loads((Path(recipe["output_dir"]) / "summary.json").read_text())["steps"] == 3


def test_force_without_resume_is_refused(tmp_path, tiny_model_dir):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(small_recipe(tmp_path, tiny_model_dir, n_eval=0)), encoding="utf-8")
    fails(invoke("train", path, "--force"), "--force applies only with --resume")
    assert not (tmp_path / "run").exists()
