"""train.compile: every decoder layer compiled for training, and given back uncompiled after."""
from __future__ import annotations

import pytest
import torch

from tunesmith.modeling import decoder_body
from tunesmith.training.run import compile_layers


def test_compile_layers_compiles_each_layer_and_undo_restores_the_plain_call(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    layers = list(decoder_body(model).layers)
    undo = compile_layers(model)
    assert all(layer._compiled_call_impl is not None for layer in layers)
    undo()
    assert all(layer._compiled_call_impl is None for layer in layers)
    ids = torch.randint(0, 100, (1, 6))
    model(input_ids=ids)  # runs the plain forward: nothing was compiled


@pytest.mark.slow
def test_compiled_training_equals_plain_training(tmp_path, tiny_recipe, monkeypatch):
    """Dynamo traces the layers (fused LoRA branch, packed attention) and the run trains the same. The backend is
    eager here (dynamo alone): inductor's C++ build took minutes on 2 cores (bench/compile.py measures the real one)."""
    from tunesmith.config import load_config
    from tunesmith.training.run import train

    plain_compile = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: plain_compile(self, backend="eager", **kw))

    losses = {}
    for flag in (False, True):
        cfg = load_config(tiny_recipe, [f"output_dir={tmp_path / str(flag)}", "train.max_steps=1", "train.batch_size=2",
                                        "method.dropout=0.0", "data.eval=null", f"train.compile={str(flag).lower()}"])
        losses[flag] = train(cfg, progress=False).summary["train_loss"]
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
