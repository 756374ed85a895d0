"""`tunesmith serve` end to end: a real uvicorn server on a free local port, called with the official `openai`
client, serving a two-task continual run (task1 [Booking], task2 [Shopping] stacked on task1), another run's
adapter (`--adapter booking=RUN1`) and the tiny base.

Answers are checked against what the rest of tunesmith says independently: `tunesmith chat`'s session,
`eval`'s batched greedy generation, the chat template rendered and tokenized by hand for usage counts, and
the same request served alone (for batching). Units without a model: test_serve_units.py.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
import torch
from safetensors.torch import load_file, save_file

from tunesmith.chat import make_chat_session
from tunesmith.config import load_config
from tunesmith.data.assemble import eval_conversations
from tunesmith.data.templates import render
from tunesmith.inference import generate_batch, load_for_inference
from tunesmith.serving.server import BackgroundServer, exposure_warning

from helpers import fails, invoke, ok, task_recipe

KEY = "test-key"
NAMES = ["task1", "task2", "booking"]


def _train(tmp: Path, model_dir, name: str, rows, held, prefix: str, seed: int, **extra) -> Path:
    """A 1-step LoRA run whose lora_B weights are then randomised, so its adapter changes answers visibly."""
    from tunesmith.training.run import train

    recipe = task_recipe(tmp, model_dir, name, rows, held, prefix, steps=1,
                         eval_section={"max_new_tokens": 6, "limit": 4}, **extra)
    run = train(load_config(recipe), progress=False).output_dir
    path = run / "adapter_model.safetensors"
    g = torch.Generator().manual_seed(seed)
    save_file({k: (torch.randn(v.shape, generator=g) * 0.5 if "lora_B" in k else v) for k, v in load_file(path).items()}, path)
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    from tunesmith.demo.booking import generate as booking
    from tunesmith.demo.shopping import generate as shopping

    tmp = tmp_path_factory.mktemp("serve")
    run1 = _train(tmp, tiny_model_dir, "task1", *booking(n_train=8, n_eval=4, seed=1), "[Booking]", seed=0)
    run2 = _train(tmp, tiny_model_dir, "task2", *shopping(n_train=8, n_eval=4, seed=1), "[Shopping]", seed=1,
                  continual={"previous": [str(run1)], "strategy": "progressive"})
    return {"run1": run1, "run2": run2, "tmp": tmp}


def _hashes(*folders: Path) -> dict:
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for d in folders for f in sorted(d.rglob("*")) if f.is_file()}


@pytest.fixture(scope="module")
def server(runs):
    before = _hashes(runs["run1"], runs["run2"])
    with BackgroundServer(str(runs["run2"]), adapters=[f"booking={runs['run1']}"], api_key=KEY,
                          max_batch=32, max_queue=256) as s:
        yield s
    assert _hashes(runs["run1"], runs["run2"]) == before  # serving never writes into a run folder


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0)


def _chat(client, model: str, text: str, max_tokens: int = 8, **kw):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}],
                                          max_tokens=max_tokens, temperature=0, **kw)


def _post(url: str, body: bytes, key: str | None = KEY) -> tuple[int, dict | str]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body, headers=headers, method="POST")) as r:
            text = r.read().decode()
            return r.status, text
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read().decode())


def test_models_lists_each_task_the_extra_adapter_the_base_and_auto(client, tiny_model_dir):
    assert [m.id for m in client.models.list()] == ["task1", "task2", "booking", tiny_model_dir.name, "auto"]


def test_served_answer_equals_tunesmith_chat_with_exact_usage(client, runs, tokenizer):
    loaded2, loaded1 = load_for_inference(str(runs["run2"])), load_for_inference(str(runs["run1"]))
    text = "Ana booked a table for 2 in Lima on May 4."
    want = {"task1": make_chat_session(loaded2, "task1", max_new_tokens=8).reply(text),
            "task2": make_chat_session(loaded2, "task2", max_new_tokens=8).reply(text),
            "booking": make_chat_session(loaded1, None, max_new_tokens=8).reply(text)}  # run 1 on its own
    assert len(set(want.values())) > 1 and all(want.values())  # the adapters answer differently, and say something
    for name, prefix in [("task1", "[Booking]"), ("task2", "[Shopping]"), ("booking", "[Booking]")]:
        got = _chat(client, name, text)
        assert got.choices[0].message.content == want[name], name
        prompt = render(tokenizer, [{"role": "user", "content": f"{prefix} {text}"}], add_generation_prompt=True)
        assert got.usage.prompt_tokens == len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        assert got.choices[0].finish_reason == "length" and got.usage.completion_tokens == 8
        assert got.usage.total_tokens == got.usage.prompt_tokens + 8


def test_served_answers_equal_eval_generation(client, runs):
    config = load_config(runs["run2"] / "config.yaml")
    convs = eval_conversations(config)[:4]
    loaded = load_for_inference(str(runs["run2"]))
    prompts = [render(loaded.tokenizer, conv[:-1], add_generation_prompt=True) for conv, _ in convs]
    want = generate_batch(loaded.model, loaded.tokenizer, prompts, 6)
    got = [client.chat.completions.create(model="task2", messages=conv[:-1], max_tokens=6, temperature=0)
           .choices[0].message.content for conv, _ in convs]
    assert got == want


def test_auto_routes_by_task_prefix_like_chat_and_eval(client, runs):
    for text, task in [("[Booking] Bo, 3 guests, Oslo", "task1"), ("[Shopping] two lemons", "task2")]:
        assert _chat(client, "auto", text).choices[0].message.content == _chat(client, task, text).choices[0].message.content
    # No prefix: the model as loaded, nothing added, as `chat --adapter auto` does.
    want = make_chat_session(load_for_inference(str(runs["run2"])), "auto", max_new_tokens=8).reply("two lemons")
    assert _chat(client, "auto", "two lemons").choices[0].message.content == want


def test_streaming_joins_to_the_non_streamed_answer(client, server):
    text = "[Booking] Ana, 2 guests, Lima"
    whole = _chat(client, "task1", text, max_tokens=10)
    chunks = list(_chat(client, "task1", text, max_tokens=10, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10 and chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    # Sampled text completions, n=2: the same seed gives the same choices streamed or not.
    kw = dict(model="task2", prompt="two lemons and", max_tokens=8, temperature=0.9, seed=7, n=2)
    plain = client.completions.create(**kw)
    pieces = {0: "", 1: ""}
    for chunk in client.completions.create(**kw, stream=True):
        for choice in chunk.choices:
            pieces[choice.index] += choice.text
    assert pieces == {c.index: c.text for c in plain.choices}
    status, raw = _post(server.url + "/chat/completions", json.dumps(
        {"model": "task1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True}).encode())
    assert status == 200 and raw.startswith("data: {") and raw.endswith("data: [DONE]\n\n")


def test_sampling_settings(client):
    greedy = _chat(client, "task1", "Ana", max_tokens=8).choices[0].message.content

    def sampled(**kw):
        return client.chat.completions.create(model="task1", messages=[{"role": "user", "content": "Ana"}],
                                              max_tokens=8, **kw).choices[0].message.content

    assert sampled(temperature=1.0, top_p=1e-9, seed=3) == greedy  # top_p that keeps one token is greedy
    assert sampled(temperature=1.5, seed=11) == sampled(temperature=1.5, seed=11)
    assert len({sampled(temperature=1.5, seed=s) for s in range(4)}) > 1
    many = client.chat.completions.create(model="task1", messages=[{"role": "user", "content": "Ana"}], max_tokens=4,
                                          temperature=0, n=3)
    assert [c.index for c in many.choices] == [0, 1, 2] and len({c.message.content for c in many.choices}) == 1
    assert many.usage.completion_tokens == 12


def test_stop_sequences_cut_text_completions(client):
    full = client.completions.create(model="task1", prompt="Ana booked", max_tokens=12, temperature=0).choices[0]
    word = next(w for w in full.text.split() if full.text.find(w) > 0)
    cut = client.completions.create(model="task1", prompt="Ana booked", max_tokens=12, temperature=0, stop=[word])
    assert cut.choices[0].text == full.text[: full.text.find(word)] and cut.choices[0].finish_reason == "stop"
    short = client.completions.create(model="task1", prompt="Ana booked", max_tokens=3, temperature=0)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3


def _error(call) -> tuple[int, dict]:
    with pytest.raises(openai.APIStatusError) as info:
        call()
    return info.value.status_code, info.value.response.json()["error"]


def test_every_bad_request_is_an_openai_error_and_the_server_keeps_serving(client, server):
    msgs = [{"role": "user", "content": "hi"}]
    chat = client.chat.completions.create
    cases = [
        (lambda: chat(model="task1", messages=msgs, max_tokens=-1), 400, "max_tokens"),
        (lambda: chat(model="task1", messages=[{"role": "robot", "content": "hi"}]), 400, "unknown role 'robot'"),
        (lambda: chat(model="task1", messages=[{"role": "user", "content": "word " * 600}]), 400, "context is 512"),
        (lambda: chat(model="task1", messages=msgs, max_tokens=500), 400, "ask for at most"),
        (lambda: chat(model="task1", messages=msgs, n=99), 400, "at most 32 answers"),
        (lambda: chat(model="task1", messages=msgs, stop=["a", "b", "c", "d", "e"]), 400, "at most 4 stop"),
        (lambda: chat(model="nope", messages=msgs), 404, "model 'nope' does not exist"),
        (lambda: openai.OpenAI(base_url=server.url, api_key="wrong", max_retries=0).models.list(), 401, "API key"),
    ]
    for call, status, fragment in cases:
        got, error = _error(call)
        assert got == status and fragment in error["message"], (status, error)
        assert set(error) == {"message", "type", "param", "code"}
    status, body = _post(server.url + "/chat/completions", b'{"model": "task1", "messages": [', KEY)
    assert status == 400 and body["error"]["message"].startswith("malformed JSON")
    status, body = _post(server.url + "/chat/completions", b"{}", key=None)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert _chat(client, "task1", "still there?", max_tokens=2).choices[0].finish_reason == "length"


@pytest.mark.slow
def test_a_full_queue_answers_429_and_the_server_recovers(tiny_model_dir):
    with BackgroundServer(str(tiny_model_dir), max_batch=1, max_queue=1) as s:
        client = openai.AsyncOpenAI(base_url=s.url, api_key="none", max_retries=0)

        async def one():
            return await client.completions.create(model=tiny_model_dir.name, prompt="a", max_tokens=150, temperature=0)

        async def burst():
            return await asyncio.gather(*[one() for _ in range(6)], return_exceptions=True)

        results = asyncio.run(burst())
        assert any(isinstance(r, openai.RateLimitError) for r in results)
        assert all(isinstance(r, openai.RateLimitError) or r.choices[0].finish_reason == "length" for r in results)
        again = openai.OpenAI(base_url=s.url, api_key="none", max_retries=0)
        assert again.completions.create(model=tiny_model_dir.name, prompt="a", max_tokens=2).usage.completion_tokens == 2


@pytest.mark.slow
def test_100_concurrent_requests_over_two_adapters_and_the_base_equal_each_served_alone(client, server, tiny_model_dir):
    models = ["task1", "task2", tiny_model_dir.name, "booking"]
    texts = ["[Booking] Ana, 2 guests", "[Shopping] eggs", "Lima on May 4", "three lemons, two limes", "hello there"]
    requests = [(models[i % 4], texts[(i // 4) % 5], 4 + i % 5) for i in range(100)]
    alone = {r: _chat(client, r[0], r[1], max_tokens=r[2]).choices[0].message.content for r in sorted(set(requests))}
    assert len(set(alone.values())) > 5  # adapters and lengths make the answers differ
    engine = server.app.state.serving.engine
    engine.batches.clear()
    aclient = openai.AsyncOpenAI(base_url=server.url, api_key=KEY, max_retries=0)

    async def everything():
        calls = [aclient.chat.completions.create(model=m, messages=[{"role": "user", "content": t}], max_tokens=n,
                                                 temperature=0) for m, t, n in requests]
        return await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), timeout=120)

    start = time.monotonic()
    results = asyncio.run(everything())
    errors = [r for r in results if isinstance(r, Exception)]
    assert not errors, errors[:3]
    assert [r.choices[0].message.content for r in results] == [alone[r] for r in requests]
    assert time.monotonic() - start < 120
    assert len(engine.batches) < 100 and any(stacks > 1 for _, stacks in engine.batches)  # batched, adapters mixed


# ---- the command ----------------------------------------------------------------------------------------------


def test_serve_command_warns_on_an_open_host_and_reads_the_key_from_the_environment(monkeypatch, runs):
    import tunesmith.serving.server as server_module

    calls = []
    monkeypatch.setattr(server_module, "serve", lambda *a, **kw: calls.append((a, kw)))
    out = invoke("serve", runs["run2"], "--host", "0.0.0.0")
    ok(out)
    assert "without an API key" in out.stderr and calls[-1][1]["api_key"] is None and calls[-1][1]["host"] == "0.0.0.0"
    monkeypatch.setenv("TUNESMITH_API_KEY", "from-env")
    out = invoke("serve", runs["run2"], "--host", "0.0.0.0", "--adapter", f"b={runs['run1']}")
    ok(out)
    assert "without an API key" not in out.stderr and calls[-1][1]["api_key"] == "from-env"
    assert calls[-1][0] == (str(runs["run2"]), [f"b={runs['run1']}"]) and calls[-1][1]["port"] == 8000
    assert exposure_warning("127.0.0.1", None) is None


def test_serve_command_bad_inputs(runs, tmp_path):
    run = str(runs["run2"])
    fails(invoke("serve", "--port", "0", run, "--adapter", "oops"), "--adapter oops", "NAME=RUN")
    fails(invoke("serve", "--port", "0", run, "--adapter", f"x={tmp_path}"), "not a finished adapter run")
    fails(invoke("serve", "--port", "0", run, "--adapter", f"x={runs['run2']}"), "continual run")
    fails(invoke("serve", "--port", "0", run, "--adapter", f"x={runs['run1']}", "--adapter", f"x={runs['run1']}"), "given twice")
    fails(invoke("serve", run, "--port", "70000"), "--port 70000")
    fails(invoke("serve", run, "--max-batch", "0"), "--max-batch 0")
    fails(invoke("serve", run, "--max-queue", "0"), "--max-queue 0")
    fails(invoke("serve", "--port", "0", tmp_path / "missing"), "missing")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        fails(invoke("serve", run, "--port", port), f"--port {port}", "in use")
    other = tmp_path / "other-base"
    other.mkdir()
    for f in runs["run1"].iterdir():
        if f.is_file():
            (other / f.name).write_bytes(f.read_bytes())
    config = (other / "config.yaml").read_text()
    (other / "config.yaml").write_text(config.replace(str(load_config(runs["run1"] / "config.yaml").model),
                                                      "smollm2-135m-instruct"))
    fails(invoke("serve", "--port", "0", run, "--adapter", f"x={other}"), "was trained on 'smollm2-135m-instruct'",
          "adapters only apply to the base")


@pytest.mark.slow
def test_builtin_model_served_concurrently_equals_tunesmith_chat():
    from tunesmith.chat import ChatSession

    model = "smollm2-135m-instruct"
    questions = ["What is the capital of France?", "Name a primary color.", "What is 2 + 2?", "Say hello in Spanish."]
    loaded = load_for_inference(model)
    want = [ChatSession(loaded, max_new_tokens=16).reply(q) for q in questions]
    with BackgroundServer(model) as s:
        aclient = openai.AsyncOpenAI(base_url=s.url, api_key="none", max_retries=0)

        async def ask_all():
            return await asyncio.gather(*[aclient.chat.completions.create(
                model=model, messages=[{"role": "user", "content": q}], max_tokens=16, temperature=0) for q in questions])

        got = asyncio.run(ask_all())
        assert [r.choices[0].message.content for r in got] == want
        assert max(rows for rows, _ in s.app.state.serving.engine.batches) > 1  # answered as a batch
        stream = openai.OpenAI(base_url=s.url, api_key="none").chat.completions.create(
            model=model, messages=[{"role": "user", "content": questions[0]}], max_tokens=16, temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want[0]
