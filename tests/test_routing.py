"""Routing without a model: which task a message or eval example goes to, and the prefix it gets (routing.py).

The end-to-end behaviour (adapters switched, chat and eval routed) is in test_continual.py; this pins the rules
the chat session, `eval --adapter` and the server share, on hand-built routes.
"""
from __future__ import annotations

from tunesmith.routing import Route, Router, group_by_route

BOOKING = Route("booking", ["booking"], ["[Booking]"], "/runs/booking")
EU = Route("eu", ["eu"], ["[Booking] EU"], "/runs/eu")  # starts with BOOKING's prefix
SHOPPING = Route("shopping", ["booking", "default"], ["[Shopping]", "[Groceries]"], "/runs/shopping")


def _conv(text: str) -> tuple[list[dict], str]:
    return [{"role": "system", "content": "[Groceries] not the user"}, {"role": "user", "content": text},
            {"role": "assistant", "content": "ok"}], "rows.jsonl:1"


def test_auto_takes_the_longest_prefix_and_keeps_the_task_of_the_last_message():
    auto = Router([BOOKING, EU, SHOPPING], auto=True)
    assert auto.choose("[Booking] EU Ana, 2 guests", None) is EU  # "[Booking]" starts it too, but is shorter
    assert auto.choose("[Booking] Ana", EU) is BOOKING
    assert auto.choose("[Groceries] eggs", None) is SHOPPING
    assert auto.choose("and two lemons", SHOPPING) is SHOPPING  # no prefix: the conversation's task goes on
    assert auto.choose("hello", None) is None


def test_fixed_route_and_the_runs_own_task():
    assert Router([BOOKING, SHOPPING], fixed=BOOKING).choose("[Shopping] eggs", None) is BOOKING
    assert Router([SHOPPING, BOOKING]).choose("Ana", None) is BOOKING  # the run's own task: the last route
    assert Router([BOOKING, SHOPPING]).choose("eggs", None) is None  # own task has two prefixes: none to add


def test_prefix_added_only_for_a_task_with_exactly_one():
    assert BOOKING.prefixed("Ana, 2 guests") == "[Booking] Ana, 2 guests"
    assert BOOKING.prefixed("[Booking] Ana") == "[Booking] Ana"
    assert SHOPPING.prefixed("eggs") == "eggs"


def test_eval_examples_grouped_by_their_first_user_message():
    convs = [_conv("[Booking] Ana"), _conv("[Shopping] eggs"), _conv("no prefix"), _conv("[Booking] EU Bo")]
    groups = group_by_route([BOOKING, EU, SHOPPING], convs)
    assert groups == {"booking": [convs[0]], "shopping": [convs[1]], "": [convs[2]], "eu": [convs[3]]}


def test_chat_starts_with_the_runs_system_prompt_unless_given_one(tiny_model_dir):
    """Training rendered every example with data.system_prompt; chat (like the server) answers under it too."""
    from tunesmith.chat import make_chat_session
    from tunesmith.config import load_config
    from tunesmith.inference import LoadedModel

    config = load_config({"model": str(tiny_model_dir), "data": {"train": "x.jsonl", "system_prompt": "Answer in JSON."}})
    loaded = LoadedModel(model=None, tokenizer=None, config=config, label="run")
    assert make_chat_session(loaded).messages() == [{"role": "system", "content": "Answer in JSON."}]
    assert make_chat_session(loaded, system="Be brief.").messages() == [{"role": "system", "content": "Be brief."}]
