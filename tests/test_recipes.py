"""Every recipe in recipes/ validates and runs on tiny inputs: training recipes one step, merge recipes on tiny
adapters.

Parametrized by file name, so a recipe added to recipes/ is covered without touching this file. Only what
makes a run tiny is overridden (model, data, lengths, steps, samples); the method and its options are the
recipe's own.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from helpers import build_tiny_llama, write_jsonl

import tunesmith
from tunesmith.config import load_config
from tunesmith.merging.spec import load_merge_spec
from tunesmith.objectives import DEFAULT_OBJECTIVE, get_objective
from tunesmith.training.run import train

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
MERGE_RECIPES = sorted(p.name for p in RECIPES.glob("merge-*.yaml"))
TRAINING_RECIPES = sorted(p.name for p in RECIPES.glob("*.yaml") if p.name not in MERGE_RECIPES)
# freeze.yaml trains the last 4 layers, so the tiny model has 4.
TINY_LAYERS = 4


def raw_recipe(name: str) -> dict:
    return yaml.safe_load((RECIPES / name).read_text())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer) -> dict:
    """A tiny model with the built-in tokenizer and 8 training rows of the booking task, 8 preference pairs of the
    concise task for preference recipes (no eval: the runs are about the recipes, and the trainer's eval is the
    same for all of them)."""
    from tunesmith.demo import concise
    from tunesmith.demo.booking import generate

    root = tmp_path_factory.mktemp("recipes")
    rows, _ = generate(n_train=8, n_eval=1, seed=1)
    return {
        "root": root,
        "model": build_tiny_llama(root / "model", tokenizer, layers=TINY_LAYERS),
        "train": write_jsonl(root / "train.jsonl", rows),
        "pairs": write_jsonl(root / "pairs.jsonl", concise.generate(n_train=8, n_eval=1, seed=1)[0]),
    }


def tiny_overrides(raw: dict, tiny: dict, out: Path, previous: list[Path]) -> list[str]:
    """`--set` overrides that shrink a recipe's run to one step on the tiny model and data."""
    preference = get_objective((raw.get("train") or {}).get("objective", DEFAULT_OBJECTIVE)).preference
    sets = [f"model={tiny['model']}", f"data.train={tiny['pairs' if preference else 'train']}", "data.eval=null", "data.eval_split=0",
            "data.max_length=128", f"output_dir={out}", "train.max_steps=1", "train.batch_size=2", "train.grad_accum=1"]
    if "ewc" in (raw.get("regularize") or {}):
        sets.append("regularize.ewc.samples=2")
    if previous:
        sets.append(f"continual.previous=[{', '.join(str(p) for p in previous)}]")
    return sets


def recipe_writing(output_dir: str, for_recipe: str) -> str:
    """The training recipe whose output_dir is `output_dir` (a continual recipe's predecessor)."""
    writers = [n for n in TRAINING_RECIPES if raw_recipe(n).get("output_dir") == output_dir]
    assert writers, f"{for_recipe} builds on {output_dir}, which no recipe in recipes/ writes"
    return writers[0]


@pytest.fixture(scope="module")
def run_recipe(tiny):
    """Trains a recipe one step on the tiny inputs (once per module), its predecessors first."""
    done: dict[str, tuple] = {}

    def run(name: str):
        if name not in done:
            raw = raw_recipe(name)
            earlier = (raw.get("continual") or {}).get("previous", [])
            previous = [run(recipe_writing(p, name))[1].output_dir for p in earlier]
            config = load_config(RECIPES / name, tiny_overrides(raw, tiny, tiny["root"] / "runs" / name, previous))
            done[name] = (config, train(config, progress=False))
        return done[name]

    return run


@pytest.mark.parametrize("name", TRAINING_RECIPES)
def test_training_recipe_validates(name):
    config = load_config(RECIPES / name)
    assert config.method.name == raw_recipe(name)["method"]["name"]


@pytest.mark.parametrize("name", TRAINING_RECIPES)
def test_training_recipe_runs_one_step_on_the_tiny_model(name, run_recipe):
    config, result = run_recipe(name)
    assert config.method.name == raw_recipe(name)["method"]["name"]
    assert result.summary["steps"] == 1
    assert math.isfinite(result.summary["train_loss"])
    saved = [p.name for p in result.output_dir.glob("*.safetensors")]
    assert "adapter_model.safetensors" in saved or "model.safetensors" in saved, saved


@pytest.mark.parametrize("name", MERGE_RECIPES)
def test_merge_recipe_validates(name):
    spec = load_merge_spec(RECIPES / name)
    assert spec.method == raw_recipe(name)["method"]


@pytest.fixture(scope="module")
def tiny_adapters(tiny) -> list[Path]:
    """LoRA adapters on the tiny model with random (non-zero) A and B, standing in for task runs: as many as the
    largest merge recipe lists."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = []
    for seed in range(1, 1 + max(len(raw_recipe(n)["models"]) for n in MERGE_RECIPES)):
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny["model"]),
                               LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", task_type="CAUSAL_LM"))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
        model.save_pretrained(tiny["root"] / f"adapter-{seed}")
        out.append(tiny["root"] / f"adapter-{seed}")
    return out


@pytest.mark.parametrize("name", MERGE_RECIPES)
def test_merge_recipe_runs_on_tiny_adapters(name, tiny, tiny_adapters, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    models = range(len(raw_recipe(name)["models"]))
    sets = [f"base_model={tiny['model']}"] + [f"models.{i}.model={tiny_adapters[i]}" for i in models]
    spec = load_merge_spec(RECIPES / name, sets)
    out = tunesmith.merge(spec, tmp_path / "merged", progress=False)
    assert yaml.safe_load((out / "merge_spec.yaml").read_text())["method"] == raw_recipe(name)["method"]
    merged, base = load_file(out / "model.safetensors"), load_file(tiny["model"] / "model.safetensors")
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[q_proj], base[q_proj])
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
