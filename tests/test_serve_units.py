"""The server's pure parts, without a model: streaming text and stop sequences, top-p, the queue bound, adapter
specs, request validation. End to end over HTTP with the openai client: test_serve.py."""
from __future__ import annotations

import asyncio

import pytest
import torch

from tunesmith.errors import TunesmithError
from tunesmith.serving.batch import Row, Sampling, top_p_filter
from tunesmith.serving.decoding import AnswerText, held_back
from tunesmith.serving.engine import Engine
from tunesmith.serving.protocol import ApiError, ChatCompletionRequest
from tunesmith.serving.registry import parse_adapter_specs

VOCAB = {1: "Hel", 2: "lo", 3: " wor", 4: "ld", 5: "END", 6: " ", 7: "\n", 8: "E", 9: "x"}


def decode(ids):
    return "".join(VOCAB[i] for i in ids)


def stream(ids, stops=(), strip=False):
    text = AnswerText(decode, list(stops), strip)
    pieces = []
    for i in ids:
        pieces.append(text.add(i))
        if text.stopped:
            break
    pieces.append(text.finish())
    return pieces, text.text


def test_streamed_pieces_join_to_the_answer():
    pieces, final = stream([1, 2, 3, 4])
    assert pieces == ["Hel", "lo", " wor", "ld", ""] and final == "Hello world"


def test_a_stop_sequence_cuts_the_answer_and_is_never_streamed():
    pieces, final = stream([1, 2, 8, 9, 5, 3], stops=["END"])
    assert final == "HelloEx" and "".join(pieces) == final  # "E" was held back until "x" showed it is not "END"
    assert pieces[2] == ""  # after "E": could be the start of "END"
    pieces, final = stream([1, 2, 3, 5, 4], stops=["o wo"])  # a stop spanning tokens
    assert final == "Hell" and "".join(pieces) == "Hell"


def test_held_back_is_the_longest_suffix_that_starts_a_stop():
    assert held_back("abcEN", ["END", "Nope"]) == 2
    assert held_back("abc", ["END"]) == 0
    assert held_back("abcE", ["xyz", "EE"]) == 1


def test_chat_answers_are_stripped_like_tunesmith_chat():
    pieces, final = stream([6, 7, 1, 2, 6, 7], strip=True)
    assert final == "Hello" and "".join(pieces) == "Hello"
    assert pieces[:2] == ["", ""]  # leading whitespace never sent
    pieces, final = stream([1, 6, 2], strip=True)
    assert pieces == ["Hel", "", " lo", ""] and final == "Hel lo"  # inner whitespace waits for the next word


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.2, 0.5, 0.3])
    logits = probs.log()
    # hand-computed: sorted 0.5, 0.3, 0.2; cumulative before each 0, 0.5, 0.8
    assert torch.isinf(top_p_filter(logits, 0.6)).tolist() == [True, False, False]
    assert torch.isinf(top_p_filter(logits, 0.45)).tolist() == [True, False, True]
    assert torch.isinf(top_p_filter(logits, 0.81)).tolist() == [False, False, False]
    assert torch.equal(top_p_filter(logits, 1.0), logits)


def _row():
    return Row([1, 2], (), 4, Sampling(), AnswerText(decode, [], False))


def test_a_full_queue_answers_429():
    async def main():
        engine = Engine(None, 0, [5], max_batch=1, max_queue=1)
        await engine.start()  # its loop has not run yet: nothing leaves the queue
        engine.submit([_row()])
        with pytest.raises(ApiError) as err:
            engine.submit([_row()])
        await engine.stop()
        return err.value

    error = asyncio.run(main())
    assert error.status == 429 and error.body.error.code == "queue_full" and "busy" in error.body.error.message


@pytest.mark.parametrize("spec, fragment", [
    ("nameonly", "write NAME=RUN"),
    ("=runs/x", "write NAME=RUN"),
    ("bad name=runs/x", "must be letters, digits"),
    ("auto=runs/x", "not one of"),
    ("x=/no/such/run", "is not a finished adapter run"),
])
def test_bad_adapter_specs(spec, fragment):
    with pytest.raises(TunesmithError, match=fragment):
        parse_adapter_specs([spec])


def test_request_validation():
    ok = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                               stop="x", max_completion_tokens=3, max_tokens=9)
    assert ok.messages[0].text() == "hi" and ok.stops() == ["x"] and ok.token_limit() == 3
    for bad, field in [({"max_tokens": -1}, "max_tokens"), ({"temperature": 3}, "temperature"), ({"n": 0}, "n"),
                       ({"top_p": 0}, "top_p"), ({"stop": ["a"] * 5}, "stop"), ({"logprobs": True}, "logprobs"),
                       ({"messages": [{"role": "robot", "content": "hi"}]}, "role"), ({"messages": []}, "messages")]:
        with pytest.raises(ValueError, match=field):
            ChatCompletionRequest(**{"model": "m", "messages": [{"role": "user", "content": "hi"}], **bad})


def test_chat_prompt_adds_the_runs_system_prompt_as_training_did(tokenizer):
    from tunesmith.data.formats import to_conversation
    from tunesmith.data.loading import Row as DataRow
    from tunesmith.data.templates import render
    from tunesmith.serving.handlers import Serving
    from tunesmith.serving.registry import Registry, ServedModel

    served = ServedModel("m", (), None, "Answer in JSON.")
    serving = Serving(tokenizer, None, Registry([served], served), context=512)
    row = {"messages": [{"role": "user", "content": "Ana, 2 guests"}, {"role": "assistant", "content": "{}"}]}
    trained = to_conversation(DataRow(row, "x.jsonl:1"), "messages", "Answer in JSON.")  # how training built it
    req = ChatCompletionRequest(model="m", messages=row["messages"][:1])
    assert serving.chat_prompt(req) == (served, render(tokenizer, trained[:-1], add_generation_prompt=True))
    own = ChatCompletionRequest(model="m", messages=[{"role": "developer", "content": "Be brief."}, row["messages"][0]])
    assert "Answer in JSON." not in serving.chat_prompt(own)[1] and "Be brief." in serving.chat_prompt(own)[1]
