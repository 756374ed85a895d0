"""The endpoint teacher against a scripted OpenAI-compatible server: retries with backoff on 429/5xx, counted
requests and tokens, bounded concurrency, seeded sampling, and one clear error for each thing a user can fix."""
from __future__ import annotations

import socket

import pytest
from datagen_endpoint import ScriptedEndpoint

from tunesmith.datagen.teacher import Request
from tunesmith.datagen.teachers import TeacherSpec, make_teacher
from tunesmith.errors import TunesmithError


def _echo(text: str, body: dict) -> str:
    return f"echo: {text}"


def _teacher(url: str, **kw):
    return make_teacher(TeacherSpec(url, **{"backoff": 0.001, "retries": 3, "timeout": 5.0, **kw}))


def _ask(teacher, *texts, seed=7):
    return teacher.generate([Request([{"role": "user", "content": t}], max_tokens=16, seed=seed) for t in texts])


def test_replies_in_order_with_counts_and_the_sampling_options_sent():
    with ScriptedEndpoint(_echo) as ep:
        teacher = _teacher(ep.url, concurrency=3)
        replies = _ask(teacher, "a", "b", "c", "d")
        assert [r.text for r in replies] == ["echo: a", "echo: b", "echo: c", "echo: d"]
        assert teacher.model == "scripted"  # the only model /v1/models lists
        assert teacher.usage.as_dict() == {"requests": 5, "retries": 0, "failed": 0, "prompt_tokens": 40,
                                           "completion_tokens": 20}  # 1 models request + 4 chats
        sent = ep.chat_requests()[0]
        assert sent["seed"] == 7 and sent["max_tokens"] == 16 and sent["model"] == "scripted"


def test_retries_429_and_503_with_backoff_then_succeeds():
    with ScriptedEndpoint(_echo) as ep:
        teacher = _teacher(ep.url, model="m")
        ep.fail_next = [429, 503]
        assert _ask(teacher, "x")[0].text == "echo: x"
        assert teacher.usage.requests == 3 and teacher.usage.retries == 2


def test_server_errors_past_the_retries_stop_with_one_line():
    with ScriptedEndpoint(_echo) as ep:
        teacher = _teacher(ep.url, model="m")
        ep.fail_with = 500
        with pytest.raises(TunesmithError, match="kept answering HTTP 500 after 4 tries.*rerun"):
            _ask(teacher, "x")
        assert len(ep.chat_requests()) == 4


def test_concurrency_is_bounded():
    with ScriptedEndpoint(_echo) as ep:
        ep.delay = 0.05
        _ask(_teacher(ep.url, model="m", concurrency=2), *"abcdef")
        assert ep.max_in_flight == 2


def test_malformed_reply_is_a_counted_failure_not_a_crash():
    with ScriptedEndpoint(_echo) as ep:
        ep.malformed = True
        teacher = _teacher(ep.url, model="m")
        reply = _ask(teacher, "x")[0]
        assert reply.finish_reason == "error" and "malformed" in reply.error and teacher.usage.failed == 1


def test_unreachable_teacher_is_one_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens there
    with pytest.raises(TunesmithError, match="unreachable"):
        _teacher(f"http://127.0.0.1:{port}/v1", model="m", retries=1).generate(
            [Request([{"role": "user", "content": "x"}])])


def test_missing_key_variable_and_refused_key(monkeypatch):
    monkeypatch.delenv("TS_TEST_KEY", raising=False)
    with pytest.raises(TunesmithError, match="TS_TEST_KEY is not set"):
        _teacher("http://127.0.0.1:9/v1", model="m", key_env="TS_TEST_KEY")
    with ScriptedEndpoint(_echo) as ep:
        ep.fail_with = 401
        with pytest.raises(TunesmithError, match="refused the API key.*--key-env"):
            _ask(_teacher(ep.url, model="m"), "x")
    with pytest.raises(TunesmithError, match="--key-env is for endpoint teachers"):
        make_teacher(TeacherSpec("smollm2-135m-instruct", key_env="X"))


def test_local_teacher_samples_reproducibly_and_marks_length_cuts(tiny_model_dir):
    teacher = make_teacher(TeacherSpec(str(tiny_model_dir)))
    requests = [Request([{"role": "user", "content": t}], max_tokens=5, temperature=0.9, seed=3) for t in ("a", "bb", "c")]
    first, again = teacher.generate(requests), teacher.generate(requests)
    assert [r.text for r in first] == [r.text for r in again]  # seeded sampling
    assert all(r.finish_reason == "length" for r in first)  # a random model does not stop within 5 tokens
    assert teacher.usage.requests == 6 and teacher.usage.completion_tokens == 30


def test_local_teacher_seeds_each_request_so_batching_does_not_change_its_text(tiny_model_dir):
    """A resumed run cuts its batches differently from an uninterrupted one; each request's text must not move."""
    teacher = make_teacher(TeacherSpec(str(tiny_model_dir)))

    def request(text, seed, temperature=0.9):
        return Request([{"role": "user", "content": text}], max_tokens=6, temperature=temperature, top_p=0.9, seed=seed)
    mine = [request("a", 3), request("bb bb bb bb", 4), request("c", 5, temperature=0.0)]
    together = [r.text for r in teacher.generate(mine)]
    teacher.batch_size = 1
    alone = [teacher.generate([r])[0].text for r in mine]
    teacher.batch_size = 8
    others = [request("a much longer prompt that pads the batch " * 3, 9), request("zz", 11)]
    mixed = teacher.generate([others[0], mine[2], mine[0], others[1], mine[1]])
    assert alone == together == [mixed[2].text, mixed[4].text, mixed[1].text]
    reseeded = teacher.generate([request("a", 30), request("bb bb bb bb", 40)])
    assert [r.text for r in reseeded] != together[:2]  # the seed, not the prompt alone, picks the tokens


def test_top_p_keeps_the_smallest_set_reaching_p():
    """Hand-computed: probabilities 0.5, 0.3, 0.2 at top_p 0.7 keep 0.5 (0 above it) and 0.3 (0.5 above it);
    0.2 has 0.8 >= 0.7 above it and goes. Temperature 2 on logits log(p) gives p**0.5, renormalised."""
    import math

    import torch

    from tunesmith.datagen.local_teacher import top_p_probabilities

    logits = torch.tensor([math.log(0.3), math.log(0.5), math.log(0.2)])
    assert torch.allclose(top_p_probabilities(logits, 1.0, 0.7), torch.tensor([0.3, 0.5, 0.0]))
    assert torch.allclose(top_p_probabilities(logits, 1.0, 1.0), torch.tensor([0.3, 0.5, 0.2]))
    assert torch.allclose(top_p_probabilities(logits, 1.0, 0.4), torch.tensor([0.0, 0.5, 0.0]))
    root = [math.sqrt(p) for p in (0.3, 0.5, 0.2)]
    assert torch.allclose(top_p_probabilities(logits, 2.0, 1.0), torch.tensor([r / sum(root) for r in root]))


@pytest.mark.slow
@pytest.mark.parametrize("served", [False, True], ids=["in-process", "tunesmith-serve"])
def test_builtin_model_as_teacher_paraphrases_end_to_end(tmp_path, served):
    """The real built-in model, in-process or behind `tunesmith serve` (the OpenAI client talking to our own
    server): two rows augmented, the output loads as training data."""
    import contextlib
    import json

    from helpers import write_jsonl

    from tunesmith.data.formats import to_conversation
    from tunesmith.data.loading import load_rows
    from tunesmith.datagen.augment import AugmentOptions, augment
    from tunesmith.serving.server import BackgroundServer

    data = write_jsonl(tmp_path / "d.jsonl", [
        {"id": "sky", "instruction": "Explain why the sky is blue.", "output": "Air scatters blue light most."},
        {"id": "tea", "instruction": "Give one tip for brewing green tea.", "output": "Use water below boiling."}])
    with BackgroundServer("smollm2-135m-instruct") if served else contextlib.nullcontext() as server:
        teacher = TeacherSpec(server.url if served else "smollm2-135m-instruct")
        report = augment(data, tmp_path / "aug.jsonl", teacher, AugmentOptions(ops=("paraphrase",), max_tokens=48))
    rows = [json.loads(line) for line in (tmp_path / "aug.jsonl").read_text().splitlines()]
    assert report.rows_out == len(rows) and report.rows_out + sum(report.dropped.values()) == 2
    # served: one GET /models finds the model's name, then one completion per row
    assert report.teacher["requests"] == (3 if served else 2) and report.teacher["completion_tokens"] > 0
    for row in load_rows(str(tmp_path / "aug.jsonl")):
        assert to_conversation(row, "auto")[-1]["content"] in ("Air scatters blue light most.", "Use water below boiling.")
