"""The method registry (methods/registry.py) is the one place a method is named.

Code outside `src/tunesmith/methods/` asks a method's entry (options, rank option, loading, bill, export,
what it combines with) instead of comparing `method.name` with a literal; a test scans the source for such
literals. The entries' declarations are checked against what config validation and `plan --rank` really do.
"""
from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tunesmith.config import MethodConfig, load_config
from tunesmith.errors import TunesmithError
from tunesmith.methods import METHODS
from tunesmith.planning import method_config

SRC = Path(__file__).resolve().parent.parent / "src" / "tunesmith"

# Words that are method names but mean something else where they are defined. Each is allowed only as the value
# assigned to this name in this module; the code elsewhere uses the name, so every other meaning stays visible.
OTHER_MEANINGS = {
    ("planning/setup.py", "FULL_LOSS"): "`plan --loss full`: transformers' loss over every position",
    ("merging/sources.py", "kind"): "a merge source that is a full model folder, not an adapter",
}

# One valid, non-default value for every method option (the test fails when an option is added without one).
NON_DEFAULT = {
    "r": 8, "alpha": 8.0, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"], "rslora": True, "init": "gaussian",
    "loraplus_lr_ratio": 4.0, "trainable_layers": 1, "trainable_modules": ["norm"], "init_r": 16, "target_r": 4,
    "tinit": 1, "tfinal": 1, "delta_t": 2, "orth_reg_weight": 0.1, "d_initial": 0.2, "quant_type": "fp4",
    "double_quant": False, "galore_rank": 64, "update_proj_gap": 100, "galore_scale": 0.5,
    "galore_optim": "galore_adafactor",
}
OPTIONS = set(MethodConfig.model_fields) - {"name"}
RECIPE = {"data": {"train": "train.jsonl"}}  # validation only: nothing is read


def docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring nodes of a module, its classes and functions (prose, not code)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def allowed_constants(tree: ast.AST, module: str) -> set[int]:
    """ids of the constants assigned to a name OTHER_MEANINGS lists for this module."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and (module, t.id) in OTHER_MEANINGS for t in targets):
                out |= {id(n) for n in ast.walk(node.value) if isinstance(n, ast.Constant)}
    return out


def method_name_literals(names: set[str]) -> list[str]:
    """file:line of every string constant outside methods/ that equals a method name (docstrings aside)."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        module = path.relative_to(SRC).as_posix()
        if module.startswith("methods/"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = docstrings(tree) | allowed_constants(tree, module)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in names and id(node) not in skip:
                found.append(f"{module}:{node.lineno}: {node.value!r}")
    return found


def test_no_method_name_is_written_outside_methods():
    assert method_name_literals(set(METHODS)) == []


def test_the_scan_finds_a_method_name_in_code(tmp_path, monkeypatch):
    """The scan itself: a comparison with a literal is found, the same word in a docstring or an allowed
    constant is not."""
    (tmp_path / "methods").mkdir()
    (tmp_path / "methods" / "x.py").write_text('NAME = "lora"\n')
    (tmp_path / "planning").mkdir()
    (tmp_path / "planning" / "setup.py").write_text('FULL_LOSS = "full"\nOTHER = "full"\n')
    (tmp_path / "a.py").write_text('"""lora in prose"""\ndef f(m):\n    """full"""\n    return m.name == "lora"\n')
    monkeypatch.setattr(sys.modules[__name__], "SRC", tmp_path)
    assert method_name_literals({"lora", "full"}) == ["a.py:4: 'lora'", "planning/setup.py:2: 'full'"]


def test_every_option_has_a_test_value_and_a_method():
    assert set(NON_DEFAULT) == OPTIONS
    for option in OPTIONS:
        assert any(option in m.options for m in METHODS.values()), f"no method accepts method.{option}"


@pytest.mark.parametrize("name", list(METHODS))
def test_declared_options_are_what_config_accepts(name):
    """Every option the entry declares validates with the method; every other one fails naming both."""
    entry = METHODS[name]
    assert set(entry.options) <= OPTIONS
    for option in sorted(OPTIONS):
        method = {"name": name, option: NON_DEFAULT[option]}
        if option in entry.options:
            assert getattr(load_config({**RECIPE, "method": method}).method, option) == NON_DEFAULT[option]
            continue
        with pytest.raises(TunesmithError) as err:
            load_config({**RECIPE, "method": method})
        message = str(err.value)
        assert f"method.{option} cannot be used with method.name={name}" in message
        accepting = ", ".join(n for n, m in METHODS.items() if option in m.options)
        assert f"It applies to {accepting}; remove it or change method.name" in message
        if option in entry.conflicts:
            assert f"method.name={name}: {entry.conflicts[option]}. It applies" in message


@pytest.mark.parametrize("name", list(METHODS))
def test_declarations_are_consistent(name):
    entry = METHODS[name]
    assert set(entry.conflicts) <= OPTIONS - set(entry.options), "a conflict names an option the method takes"
    assert entry.rank_option is None or entry.rank_option in entry.options
    mentioned = set(re.findall(r"[a-z_]+", entry.key_options)) & OPTIONS
    assert mentioned <= set(entry.options), f"`tunesmith methods` lists options {name} does not take"
    assert entry.when and entry.key_options


@pytest.mark.parametrize("name", list(METHODS))
def test_plan_rank_sets_the_entrys_rank_option(name):
    """`plan --rank 12` sets the option the entry names (alpha = 24 where it takes alpha), or fails with its reason."""
    entry = METHODS[name]
    if entry.rank_option is None:
        with pytest.raises(TunesmithError, match=rf"--rank does not apply to method {name}: {re.escape(entry.no_rank)}"):
            method_config(name, rank=12)
        return
    m = method_config(name, rank=12)
    assert getattr(m, entry.rank_option) == 12
    assert m.alpha == (24 if entry.takes_alpha else MethodConfig().alpha)


def test_loss_terms_need_the_selective_loss_and_stacking_comes_from_the_entries():
    """Every method takes the loss terms on the selective loss; the continual rule names the methods that stack."""
    for name in METHODS:
        assert load_config({**RECIPE, "method": {"name": name}, "regularize": {"ewc": {}}})
    with pytest.raises(TunesmithError, match="set train.selective_loss: true"):
        load_config({**RECIPE, "train": {"selective_loss": False}, "regularize": {"ewc": {}}})
    stacking = [n for n, m in METHODS.items() if m.stacks]
    assert stacking
    not_stacking = next(n for n in METHODS if n not in stacking)
    with pytest.raises(TunesmithError, match=f"continual.previous needs method.name {' or '.join(stacking)} "):
        load_config({**RECIPE, "method": {"name": not_stacking}, "continual": {"previous": ["runs/a"]}})
    for name in stacking:
        assert load_config({**RECIPE, "method": {"name": name}, "continual": {"previous": ["runs/a"]}})


def test_methods_command_prints_the_registry():
    from typer.testing import CliRunner

    from tunesmith.cli import app

    result = CliRunner().invoke(app, ["methods", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["name"] for r in rows] == list(METHODS)
    assert all(r == {"name": n, "when": m.when, "options": m.key_options} for r, (n, m) in zip(rows, METHODS.items()))


def test_config_and_registry_import_without_torch():
    """`config.py` validates against the entries, so they must stay light: the CLI starts without torch."""
    code = ("import sys, tunesmith.config, tunesmith.methods, tunesmith.planning; "
            "print(sorted(m for m in ('torch', 'peft', 'transformers', 'bitsandbytes') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
