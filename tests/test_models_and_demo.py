"""The built-in model cache (atomic, concurrent-safe) and the demo task generator."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from tunesmith import models
from tunesmith.demo import booking
from tunesmith.evaluation.scorers import json_match

REPO = Path(__file__).resolve().parent.parent


def fake_convert(calls):
    def convert(gguf, out):
        calls.append(out)
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"weights")

    return convert


def test_pull_writes_the_cache_atomically_under_tunesmith_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESMITH_HOME", str(tmp_path))
    calls = []
    monkeypatch.setattr(models, "_convert_gguf", fake_convert(calls))
    path = models.pull_builtin("smollm2-135m-instruct")
    assert path == tmp_path / "models" / "smollm2-135m-instruct"
    assert (path / "model.safetensors").read_bytes() == b"weights"
    assert models.pull_builtin("smollm2-135m-instruct") == path and len(calls) == 1  # cached
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["smollm2-135m-instruct"]  # no temp dirs left


def test_concurrent_first_use_leaves_one_complete_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESMITH_HOME", str(tmp_path))
    barrier = threading.Barrier(4)
    calls = []

    def slow_convert(gguf, out):
        barrier.wait(timeout=10)  # every thread is converting at the same time
        fake_convert(calls)(gguf, out)

    monkeypatch.setattr(models, "_convert_gguf", slow_convert)
    results, errors = [], []

    def pull():
        try:
            results.append(models.pull_builtin("smollm2-135m-instruct"))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=pull) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1
    assert (results[0] / "model.safetensors").read_bytes() == b"weights"
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["smollm2-135m-instruct"]


def test_a_crash_during_conversion_leaves_no_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESMITH_HOME", str(tmp_path))

    def crash(gguf, out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(models, "_convert_gguf", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        models.pull_builtin("smollm2-135m-instruct")
    assert not models.is_builtin_cached("smollm2-135m-instruct")
    assert list((tmp_path / "models").iterdir()) == []


def test_list_models_reports_the_builtin(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESMITH_HOME", str(tmp_path))
    [row] = models.list_models()
    assert row["name"] == "smollm2-135m-instruct" and row["installed"] and not row["cached"]


def test_booking_generator_is_deterministic_and_disjoint():
    train, held = booking.generate(n_train=600, n_eval=100, seed=0)
    assert len(train) == 600 and len(held) == 100
    assert not {r["input"] for r in train} & {r["input"] for r in held}
    assert booking.generate(n_train=600, n_eval=100, seed=0) == (train, held)
    assert booking.generate(n_train=600, n_eval=100, seed=1) != (train, held)
    for row in train[:50]:
        answer = json.loads(row["output"])
        assert set(answer) == {"name", "city", "date", "guests"}
        assert answer["name"] in row["input"] and answer["city"] in row["input"]
        assert json_match(row["output"], row["output"]) == 1.0


def test_shipped_demo_data_is_what_the_generator_writes(tmp_path):
    booking.write(tmp_path)
    for name in ("booking-train.jsonl", "booking-eval.jsonl"):
        assert (tmp_path / name).read_text() == (REPO / "recipes" / "data" / name).read_text()


def test_api_functions_stay_functions_after_their_subpackages_are_imported():
    import inspect

    import tunesmith
    import tunesmith.evaluation.run  # noqa: F401
    import tunesmith.exporting  # noqa: F401
    import tunesmith.merging.run  # noqa: F401
    import tunesmith.planning.bill  # noqa: F401
    import tunesmith.training.run  # noqa: F401

    for name, module in [("train", "tunesmith.training.run"), ("evaluate", "tunesmith.evaluation.run"),
                         ("merge", "tunesmith.merging.run"), ("plan", "tunesmith.planning"),
                         ("export", "tunesmith.exporting")]:
        fn = getattr(tunesmith, name)
        assert inspect.isfunction(fn) and fn.__module__ == module, name
