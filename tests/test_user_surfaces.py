"""What users touch that had no test of its own: the chat REPL, the demo runner, `eval --forgetting --base`,
`models pull`, `methods`, the QLoRA merged export, and the one-line report of an unexpected error.

Every test runs with a temporary TUNESMITH_HOME, so nothing is written into the user's ~/.cache/tunesmith.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from tunesmith.cli import app

from helpers import fails, invoke, ok

BUILTIN = "smollm2-135m-instruct"


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "tunesmith-home"
    monkeypatch.setenv("TUNESMITH_HOME", str(path))
    return path


def tree_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# --- chat REPL ------------------------------------------------------------------------------------


def chat_repl(target: Path, stdin: str, monkeypatch):
    """Run `tunesmith chat` on stdin; return the result and the messages the model was shown, turn by turn."""
    from tunesmith import chat as chat_module

    shown, real_render = [], chat_module.render

    def recording_render(tokenizer, messages, **kwargs):
        shown.append([dict(m) for m in messages])
        return real_render(tokenizer, messages, **kwargs)

    monkeypatch.setattr(chat_module, "render", recording_render)
    return invoke("chat", target, "--max-new-tokens", "3", input=stdin), shown


def user(text):
    return {"role": "user", "content": text}


def test_chat_repl_reset_system_and_exit(tiny_model_dir, monkeypatch):
    stdin = ("hi\n\nhello\n/reset\nagain\n/system Be brief.\nfourth\n/systems are down\n/system\nfifth\n"
             "/exit\nnever answered\n")
    result, shown = chat_repl(tiny_model_dir, stdin, monkeypatch)
    ok(result)
    assert len(shown) == 6  # the empty line is skipped, nothing after /exit is answered
    assert shown[0] == [user("hi")]
    assert shown[1][0] == user("hi") and shown[1][1]["role"] == "assistant" and shown[1][2] == user("hello")
    assert shown[1][1]["content"] in result.stdout  # the answer the user saw is the one kept in the history
    assert shown[2] == [user("again")]  # /reset
    system = {"role": "system", "content": "Be brief."}
    assert shown[3] == [system, user("fourth")]  # /system TEXT sets it and clears the history
    assert shown[4][0] == system and shown[4][-1] == user("/systems are down")  # a message, not a command
    assert shown[5] == [user("fifth")]  # a bare /system removes the system message
    assert "history cleared\n" in result.stderr
    assert "system message: 'Be brief.' (history cleared)" in result.stderr
    assert "system message: None (history cleared)" in result.stderr
    assert "Traceback" not in result.output


def test_chat_repl_ends_at_end_of_input_and_quit(tiny_model_dir, monkeypatch):
    result, shown = chat_repl(tiny_model_dir, "hi\n", monkeypatch)  # no /exit: stdin just ends
    assert ok(result).endswith("\n") and shown == [[user("hi")]]

    result, shown = chat_repl(tiny_model_dir, "/quit\nhi\n", monkeypatch)
    ok(result)
    assert shown == []


# --- make demo --------------------------------------------------------------------------------------


@pytest.fixture
def demo_recipe(tmp_path, tiny_recipe) -> Path:
    """A quickstart-like recipe for the tiny model whose run folder is tmp_path/runs/quickstart."""
    recipe = {**tiny_recipe, "output_dir": str(tmp_path / "runs" / "quickstart"),
              "train": {**tiny_recipe["train"], "max_steps": 2, "save_steps": 100, "eval_each_epoch": False},
              "eval": {**tiny_recipe["eval"], "limit": 2, "max_new_tokens": 4}}
    path = tmp_path / "quickstart.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def test_demo_refuses_a_folder_it_did_not_write(demo_recipe, tmp_path, capsys):
    from tunesmith.demo.__main__ import main

    mine = tmp_path / "runs" / "quickstart"  # the user's own run, trained with `tunesmith train`
    (mine / "checkpoint-7").mkdir(parents=True)
    (mine / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 64)
    (mine / "config.yaml").write_text("model: my-model\n")
    (mine / "checkpoint-7" / "notes.txt").write_text("three days of training")
    before = tree_hashes(mine)

    assert main(["--recipe", str(demo_recipe)]) == 1
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: "), captured.err
    assert f"{mine} exists and was not written by the demo" in captured.err
    assert f"python -m tunesmith.demo --set output_dir={mine}-demo" in captured.err
    assert "scoring the base model" not in captured.out  # refused before any slow step
    assert tree_hashes(mine) == before


@pytest.mark.slow
def test_demo_replaces_its_own_earlier_run(demo_recipe, tmp_path, capsys, monkeypatch):
    from tunesmith.demo import __main__ as demo
    from tunesmith.rundir import is_run_dir

    scored = []

    def quick_evaluate(target, base=False):  # scoring has its own tests; here it only costs time
        scored.append((Path(target), base))
        return {"score": 0.5, "scorer": "json_match", "examples": 2, "eval_loss": 1.0, "samples": [{"prediction": "{}"}]}

    monkeypatch.setattr(demo, "evaluate", quick_evaluate)
    main = demo.main
    out = tmp_path / "runs" / "quickstart"
    out.mkdir(parents=True)  # an empty folder holds no one's work
    assert main(["--recipe", str(demo_recipe)]) == 0, capsys.readouterr().err
    assert is_run_dir(out) and (out / ".tunesmith-demo").is_file()

    (out / "stale.txt").write_text("from the first demo run")
    assert main(["--recipe", str(demo_recipe)]) == 0, capsys.readouterr().err
    assert is_run_dir(out) and (out / ".tunesmith-demo").is_file()
    assert not (out / "stale.txt").exists()
    assert "json_match on 2 held-out examples: base 50% -> fine-tuned 50%" in capsys.readouterr().out
    assert scored == [(demo_recipe, True), (out, False)] * 2


# --- eval / models / methods ------------------------------------------------------------------------


def test_eval_forgetting_refuses_base(tmp_path):
    fails(invoke("eval", tmp_path / "run", "--forgetting", "--base"),
          "--forgetting already compares the base with the fine-tuned model; drop --base")


def test_models_pull_converts_once_into_tunesmith_home(home, monkeypatch):
    from tunesmith import models

    converted = []

    def fake_convert(gguf, out):
        converted.append(gguf.name)
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"weights")

    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    target = home / "models" / BUILTIN
    assert ok(invoke("models", "pull", BUILTIN)) == f"{BUILTIN}: {target}\n"
    assert converted == ["SmolLM2-135M-Instruct.Q4_1.gguf"]
    assert (target / "model.safetensors").read_bytes() == b"weights"
    ok(invoke("models", "pull", BUILTIN))
    assert len(converted) == 1  # cached
    ok(invoke("models", "pull", BUILTIN, "--force"))
    assert len(converted) == 2
    [row] = json.loads(ok(invoke("models", "list", "--json")))
    assert row["cached"] is True and row["cache_dir"] == str(target)


def test_models_pull_unknown_name():
    fails(invoke("models", "pull", "llama-9000"), "unknown model 'llama-9000'", "tunesmith models list")


@pytest.mark.slow
def test_models_pull_real_conversion_equals_the_gguf(home):
    """The real 30 s conversion, through the command, into an empty TUNESMITH_HOME."""
    from transformers import AutoModelForCausalLM

    from tunesmith.models import builtin_gguf_path

    target = home / "models" / BUILTIN
    assert ok(invoke("models", "pull", BUILTIN)) == f"{BUILTIN}: {target}\n"
    pulled = AutoModelForCausalLM.from_pretrained(target).state_dict()
    gguf = builtin_gguf_path(BUILTIN)
    straight = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).state_dict()
    assert pulled.keys() == straight.keys()
    for name, tensor in straight.items():
        assert torch.equal(pulled[name], tensor), name


def test_methods_lists_every_method_the_config_accepts(tiny_recipe):
    from typing import get_args

    from tunesmith.config import MethodConfig, load_config

    accepted = get_args(MethodConfig.model_fields["name"].annotation)  # what method.name may be
    rows = json.loads(ok(invoke("methods", "--json")))
    assert sorted(r["name"] for r in rows) == sorted(accepted)
    for r in rows:
        assert set(r) == {"name", "when", "options"} and r["when"] and r["options"]
        assert load_config({**tiny_recipe, "method": {"name": r["name"]}}).method.name == r["name"]

    text = ok(invoke("methods"))
    for name in accepted:
        assert name in text
    assert "Start with lora" in text


# --- QLoRA export --merge ---------------------------------------------------------------------------


def qlora_reference(model_dir, run_dir):
    """The trained QLoRA model in memory, built with transformers, bitsandbytes and PEFT only: NF4, double
    quantization, fp32 compute (CPU), and bitsandbytes' CPU bf16 repacking off as in training."""
    import bitsandbytes as bnb
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, device_map={"": "cpu"},
                                                dtype=torch.float32)
    for module in base.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return PeftModel.from_pretrained(base, str(run_dir)).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the reference computes in fp32 on CPU; on CUDA QLoRA computes in bf16")
def test_qlora_export_merge_loads_plain_and_matches_the_qlora_model(tiny_recipe, tiny_model_dir, tokenizer, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunesmith.config import load_config
    from tunesmith.training.run import train

    recipe = {**tiny_recipe, "method": {"name": "qlora", "r": 4, "alpha": 8, "dropout": 0.0},
              "train": {**tiny_recipe["train"], "max_steps": 1, "save_steps": 100, "eval_each_epoch": False}}
    run_dir = train(load_config(recipe), progress=False).output_dir
    adapter = run_dir / "adapter_model.safetensors"  # B = 0 after one step is nearly a no-op: make it matter
    weights, gen = load_file(adapter), torch.Generator().manual_seed(0)
    save_file({k: torch.randn(v.shape, generator=gen) * 0.2 if "lora_B" in k else v for k, v in weights.items()}, adapter)

    out = tmp_path / "merged"
    assert "merged model written to" in ok(invoke("export", run_dir, "--out", out, "--merge"))
    merged = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers: no PEFT, no bitsandbytes
    assert getattr(merged.config, "quantization_config", None) is None
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    assert not any("lora_" in n for n, _ in merged.named_parameters())

    ids = tokenizer("<|im_start|>user\nBook Oslo for 2 on 4 May.<|im_end|>\n<|im_start|>assistant\n",
                    return_tensors="pt", add_special_tokens=False)["input_ids"]
    want = logits(qlora_reference(tiny_model_dir, run_dir), ids)
    got = logits(merged, ids)
    # Both compute the same function in fp32: x(W_nf4 + sBA)^T merged, xW_nf4^T + s(xA^T)B^T unmerged; they differ
    # only by fp32 rounding (eps 1.2e-7) summed over the ops of 2 layers: measured 4e-7 on logits up to 0.7.
    # 1e-5 of the logits' scale leaves room for other CPUs' summation order, and is far below the NF4
    # quantization error that the adapter merged into the original fp32 base shows (measured 7e-2): the last
    # assert keeps that gap, so the tolerance can tell the de-quantized base from the wrong one.
    tol = 1e-5 * want.abs().max().item()
    assert (got - want).abs().max().item() <= tol
    wrong_base = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(run_dir))
    assert (logits(wrong_base.eval(), ids) - want).abs().max().item() > 100 * tol


# --- the last-resort handler ------------------------------------------------------------------------


def crash_log(stderr: str) -> Path:
    return Path(stderr.split("full traceback in ", 1)[1].split(";", 1)[0])


def test_unexpected_error_in_a_command_is_one_line_and_a_trace_file(home, monkeypatch):
    from tunesmith import models

    def broken(name, force=False):
        raise RuntimeError("disk controller on fire\nsecond line of detail")

    monkeypatch.setattr(models, "pull_builtin", broken)
    result = invoke("models", "pull", BUILTIN)
    fails(result, "unexpected RuntimeError: disk controller on fire (full traceback in ", "please report it")
    assert result.stdout == "" and "second line" not in result.stderr
    log = crash_log(result.stderr)
    assert log.parent == home / "logs"
    trace = log.read_text()
    assert "Traceback (most recent call last)" in trace and "in broken" in trace
    assert "RuntimeError: disk controller on fire\nsecond line of detail" in trace


def test_unexpected_error_outside_run_is_one_line_too(home, monkeypatch, capsys):
    """The `tunesmith` script calls the app object itself; a bug in a command's printing is caught there."""
    from tunesmith import methods

    class Broken(dict):
        def values(self):
            raise KeyError("when")

    monkeypatch.setattr(methods, "METHODS", Broken())
    with pytest.raises(SystemExit) as exit_info:
        app(["methods"], prog_name="tunesmith")
    assert exit_info.value.code == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("error: unexpected KeyError: 'when' (full traceback in ")
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err + captured.out
    assert "KeyError: 'when'" in crash_log(captured.err).read_text()


def test_user_error_text_is_printed_verbatim(monkeypatch):
    """Messages quote data such as [question, answer] or [/path]; rich must not read them as markup."""
    from tunesmith import models
    from tunesmith.errors import TunesmithError

    def refuse(name, force=False):
        raise TunesmithError("x.jsonl:3: history[0] must be a [question, answer] pair, see [/docs]")

    monkeypatch.setattr(models, "pull_builtin", refuse)
    assert fails(invoke("models", "pull", BUILTIN)) == \
        "error: x.jsonl:3: history[0] must be a [question, answer] pair, see [/docs]\n"
