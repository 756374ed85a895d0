"""SFT loss masking: which tokens carry loss, checked against hand-written expected text.

The tokenizer is the real SmolLM2 one (ChatML). For Llama-3, Mistral [INST] and Gemma, the
official templates in tests/templates/ are loaded into a copy of it. The family's control tokens
and bos/eos are registered as special tokens on that copy, as in the real model's vocabulary, so
each end-of-turn marker is a single token. `test_*_raw_vocab_*` covers the case where they are not
special.

The main assertion: decode the supervised tokens, joined, and compare the result with an expected
string written out by hand. Those strings are never computed by the code under test.
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest

from tunesmith.data.masking import (
    ASSISTANT,
    END_OF_TURN,
    IGNORE_INDEX,
    SYSTEM,
    TEMPLATE,
    USER,
    label_characters,
    tokenize_conversation,
)
from tunesmith.data.templates import apply_template_override, render
from tunesmith.errors import TunesmithError

TEMPLATES = Path(__file__).parent / "templates"

# Per family: template file (None = the tokenizer's own ChatML template), special tokens of the real
# model's vocabulary, and the end-of-turn marker the template writes after each answer.
FAMILIES = {
    "chatml": dict(template=None, special={}, end="<|im_end|>"),
    "llama3": dict(
        template="llama3.jinja",
        # Meta-Llama-3-8B-Instruct: eos is <|eot_id|> in the current tokenizer_config.json.
        special={
            "bos_token": "<|begin_of_text|>",
            "eos_token": "<|eot_id|>",
            "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        },
        end="<|eot_id|>",
    ),
    "mistral": dict(template="mistral.jinja", special={"bos_token": "<s>", "eos_token": "</s>"}, end="</s>"),
    "gemma": dict(
        template="gemma.jinja",
        special={
            "bos_token": "<bos>",
            "eos_token": "<eos>",
            "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"],
        },
        end="<end_of_turn>",
    ),
}
ALL = list(FAMILIES)

SMOL_DEFAULT_SYSTEM = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
)
SMOL_CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
)


def U(text):
    return {"role": "user", "content": text}


def A(text):
    return {"role": "assistant", "content": text}


def S(text):
    return {"role": "system", "content": text}


# Three assistant turns.
CONV = [
    U("Hi there"), A("Hello! How can I help?"),
    U("What is 2+2?"), A("2+2 is 4."),
    U("Thanks"), A("You are welcome."),
]

# The full render of CONV, written out by hand from each model's documented prompt format.
FULL = {
    "chatml": SMOL_DEFAULT_SYSTEM
    + "<|im_start|>user\nHi there<|im_end|>\n"
    "<|im_start|>assistant\nHello! How can I help?<|im_end|>\n"
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    "<|im_start|>assistant\n2+2 is 4.<|im_end|>\n"
    "<|im_start|>user\nThanks<|im_end|>\n"
    "<|im_start|>assistant\nYou are welcome.<|im_end|>\n",
    "llama3": "<|begin_of_text|>"
    "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nHello! How can I help?<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n2+2 is 4.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nThanks<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nYou are welcome.<|eot_id|>",
    "mistral": "<s>[INST] Hi there [/INST]Hello! How can I help?</s>"
    "[INST] What is 2+2? [/INST]2+2 is 4.</s>"
    "[INST] Thanks [/INST]You are welcome.</s>",
    "gemma": "<bos>"
    "<start_of_turn>user\nHi there<end_of_turn>\n"
    "<start_of_turn>model\nHello! How can I help?<end_of_turn>\n"
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n"
    "<start_of_turn>model\n2+2 is 4.<end_of_turn>\n"
    "<start_of_turn>user\nThanks<end_of_turn>\n"
    "<start_of_turn>model\nYou are welcome.<end_of_turn>\n",
}

SUPERVISED = {
    "chatml": {
        "all_assistant": "Hello! How can I help?<|im_end|>2+2 is 4.<|im_end|>You are welcome.<|im_end|>",
        "last_assistant": "You are welcome.<|im_end|>",
    },
    "llama3": {
        "all_assistant": "Hello! How can I help?<|eot_id|>2+2 is 4.<|eot_id|>You are welcome.<|eot_id|>",
        "last_assistant": "You are welcome.<|eot_id|>",
    },
    "mistral": {
        "all_assistant": "Hello! How can I help?</s>2+2 is 4.</s>You are welcome.</s>",
        "last_assistant": "You are welcome.</s>",
    },
    "gemma": {
        "all_assistant": "Hello! How can I help?<end_of_turn>2+2 is 4.<end_of_turn>You are welcome.<end_of_turn>",
        "last_assistant": "You are welcome.<end_of_turn>",
    },
}
for _fam in ALL:
    SUPERVISED[_fam]["everything"] = FULL[_fam]


# ---------------------------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture(scope="module")
def base_tok():
    from tunesmith.models import load_tokenizer

    tok = load_tokenizer("smollm2-135m-instruct")
    original = tok.chat_template
    yield tok
    # No test may change the shared tokenizer.
    assert tok.chat_template == original


def _family_tokenizer(base, family, register_special=True):
    spec = FAMILIES[family]
    tok = copy.deepcopy(base)
    if spec["template"]:
        apply_template_override(tok, str(TEMPLATES / spec["template"]))
    if register_special and spec["special"]:
        tok.add_special_tokens(dict(spec["special"]))
    if tok.pad_token is None or register_special:
        tok.pad_token = tok.eos_token  # what load_tokenizer does for models without a pad token: pad == eos
    return tok


@pytest.fixture(scope="module")
def toks(base_tok):
    """One private copy of the tokenizer per family. Tests treat them as read-only."""
    return {family: _family_tokenizer(base_tok, family) for family in ALL}


@pytest.fixture
def raw_tok(base_tok):
    """Per-test copy, template only, control tokens NOT special (they split into many tokens)."""

    def make(family):
        return _family_tokenizer(base_tok, family, register_special=False)

    return make


def supervised_ids(ex):
    return [tok_id for tok_id, label in zip(ex.input_ids, ex.labels) if label != IGNORE_INDEX]


def supervised_text(tok, ex):
    return tok.decode(supervised_ids(ex), skip_special_tokens=False)


def check_invariants(ex):
    assert len(ex.input_ids) == len(ex.labels) == len(ex.categories)
    for tok_id, label in zip(ex.input_ids, ex.labels):
        assert label in (IGNORE_INDEX, tok_id)


# ---------------------------------------------------------------------------------------------
# the templates themselves


@pytest.mark.parametrize("family", ALL)
def test_template_renders_the_documented_format(toks, family):
    tok = toks[family]
    assert render(tok, CONV) == FULL[family]
    ex = tokenize_conversation(tok, CONV)
    assert ex.input_ids == tok(FULL[family], add_special_tokens=False)["input_ids"]
    check_invariants(ex)


def test_template_files_are_verbatim_single_line():
    for name in ("llama3.jinja", "mistral.jinja", "gemma.jinja"):
        text = (TEMPLATES / name).read_text(encoding="utf-8")
        assert "\n" not in text, name  # the official chat_template values are one line
    assert "raise_exception('System role not supported')" in (TEMPLATES / "gemma.jinja").read_text()
    assert "message['content'] | trim" in (TEMPLATES / "llama3.jinja").read_text()
    assert "[INST] " in (TEMPLATES / "mistral.jinja").read_text()


def test_chatml_is_the_builtin_smollm2_template(base_tok):
    assert base_tok.chat_template.startswith(SMOL_CHATML)


# ---------------------------------------------------------------------------------------------
# train_on modes on a multi-turn conversation


@pytest.mark.parametrize("mode", ["all_assistant", "last_assistant", "everything"])
@pytest.mark.parametrize("family", ALL)
def test_train_on_modes_multi_turn(toks, family, mode):
    tok = toks[family]
    ex = tokenize_conversation(tok, CONV, train_on=mode)
    check_invariants(ex)
    assert supervised_text(tok, ex) == SUPERVISED[family][mode]
    if mode == "everything":
        assert ex.labels == ex.input_ids


@pytest.mark.parametrize("family", ["chatml", "llama3"])
def test_system_message_never_carries_loss(toks, family):
    tok = toks[family]
    conv = [S("Answer in one short sentence.")] + CONV
    ex = tokenize_conversation(tok, conv, train_on="all_assistant")
    assert supervised_text(tok, ex) == SUPERVISED[family]["all_assistant"]
    chars = label_characters(tok, conv, "all_assistant")
    start = chars.text.index("Answer in one short sentence.")
    assert not any(chars.trained[: start + len("Answer in one short sentence.")])


def test_last_assistant_with_two_turns_chatml(toks):
    tok = toks["chatml"]
    conv = [U("Q1"), A("A1"), U("Q2"), A("A2")]
    assert supervised_text(tok, tokenize_conversation(tok, conv, "all_assistant")) == "A1<|im_end|>A2<|im_end|>"
    assert supervised_text(tok, tokenize_conversation(tok, conv, "last_assistant")) == "A2<|im_end|>"


# ---------------------------------------------------------------------------------------------
# content the template trims, and content it keeps verbatim

TRIM_CONV = [U("  What is up?  "), A("  answer  "), U("next"), A("\n second answer \n")]


@pytest.mark.parametrize(
    "family, expected",
    [
        # Llama-3 and Gemma trim every message: the answer text in the render is the stripped content.
        ("llama3", "answer<|eot_id|>second answer<|eot_id|>"),
        ("gemma", "answer<end_of_turn>second answer<end_of_turn>"),
        # Mistral v0.2 keeps the answer verbatim, whitespace included.
        ("mistral", "  answer  </s>\n second answer \n</s>"),
    ],
)
def test_trimmed_and_verbatim_content(toks, family, expected):
    tok = toks[family]
    ex = tokenize_conversation(tok, TRIM_CONV, train_on="all_assistant")
    check_invariants(ex)
    assert supervised_text(tok, ex) == expected


def test_llama3_trimmed_render(toks):
    tok = toks["llama3"]
    assert render(tok, TRIM_CONV[:2]) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is up?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nanswer<|eot_id|>"
    )
    chars = label_characters(tok, TRIM_CONV[:2], "all_assistant")
    trained = "".join(c for c, t in zip(chars.text, chars.trained) if t)
    assert trained == "answer<|eot_id|>"


def test_chatml_trailing_whitespace_in_answer_is_trained(toks):
    tok = toks["chatml"]
    conv = [U("Q"), A("line one\n\nline two\n")]
    ex = tokenize_conversation(tok, conv)
    assert supervised_text(tok, ex) == "line one\n\nline two\n<|im_end|>"


def test_chatml_token_straddling_header_and_answer_carries_loss(toks):
    # SmolLM2's pre-tokenizer puts the header's "\n" and the answer's first space into one token "\n "
    # (the second space joins " answer").
    # One trained character is enough for a token to carry loss, so that token is supervised, and the
    # decoded supervised text starts with the header's newline.
    tok = toks["chatml"]
    conv = [U("Q"), A("  answer  ")]
    ex = tokenize_conversation(tok, conv)
    assert supervised_text(tok, ex) == "\n  answer  <|im_end|>"
    first = supervised_ids(ex)[0]
    assert tok.decode([first]) == "\n "
    chars = label_characters(tok, conv)
    trained = "".join(c for c, t in zip(chars.text, chars.trained) if t)
    assert trained == "  answer  <|im_end|>"  # at character level the header is not trained


# ---------------------------------------------------------------------------------------------
# non-ASCII content

ZH_CONV = [U("头痛怎么办?"), A("多喝水，好好休息。😊"), U("谢谢"), A("不客气！")]
ZH_EXPECTED = {
    "chatml": "多喝水，好好休息。😊<|im_end|>不客气！<|im_end|>",
    "llama3": "多喝水，好好休息。😊<|eot_id|>不客气！<|eot_id|>",
    "mistral": "多喝水，好好休息。😊</s>不客气！</s>",
    "gemma": "多喝水，好好休息。😊<end_of_turn>不客气！<end_of_turn>",
}


@pytest.mark.parametrize("family", ALL)
def test_non_ascii_content(toks, family):
    tok = toks[family]
    ex = tokenize_conversation(tok, ZH_CONV, train_on="all_assistant")
    check_invariants(ex)
    assert supervised_text(tok, ex) == ZH_EXPECTED[family]
    # The user's question is not trained, not even one byte of a multi-byte character.
    assert "头" not in supervised_text(tok, ex)
    last = tokenize_conversation(tok, ZH_CONV, train_on="last_assistant")
    assert supervised_text(tok, last) == "不客气！" + FAMILIES[family]["end"]


# ---------------------------------------------------------------------------------------------
# the template's default system prompt (SmolLM2's ChatML)


def test_chatml_default_system_prompt_carries_no_loss(toks):
    tok = toks["chatml"]
    chars = label_characters(tok, CONV, "all_assistant")
    assert chars.text.startswith(SMOL_DEFAULT_SYSTEM)
    assert not any(chars.trained[: len(SMOL_DEFAULT_SYSTEM)])
    for mode in ("all_assistant", "last_assistant"):
        ex = tokenize_conversation(tok, CONV, train_on=mode)
        assert "SmolLM" not in supervised_text(tok, ex)
        n_sys = len(tok(SMOL_DEFAULT_SYSTEM, add_special_tokens=False)["input_ids"])
        assert ex.labels[:n_sys] == [IGNORE_INDEX] * n_sys
        assert set(ex.categories[:n_sys]) == {TEMPLATE}


def test_chatml_explicit_system_replaces_default_and_carries_no_loss(toks):
    tok = toks["chatml"]
    conv = [S("Be brief."), U("Q1"), A("A1"), U("Q2"), A("A2")]
    ex = tokenize_conversation(tok, conv, train_on="all_assistant")
    assert "SmolLM" not in tok.decode(ex.input_ids)
    assert supervised_text(tok, ex) == "A1<|im_end|>A2<|im_end|>"
    assert tok.decode(ex.input_ids) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n"
        "<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n"
        "<|im_start|>assistant\nA2<|im_end|>\n"
    )


@pytest.mark.parametrize(
    "family, conv, expected",
    [
        ("chatml", [A("Hello!")], "Hello!<|im_end|>"),
        ("chatml", [A("Hello!"), U("Q"), A("A")], "Hello!<|im_end|>A<|im_end|>"),
        ("llama3", [A("Hello!")], "Hello!<|eot_id|>"),
    ],
)
def test_assistant_first_conversation_trains_only_the_answer(toks, family, conv, expected):
    tok = toks[family]
    ex = tokenize_conversation(tok, conv, train_on="all_assistant")
    assert supervised_text(tok, ex) == expected


# ---------------------------------------------------------------------------------------------
# templates without a system role


def test_gemma_system_message_raises_with_advice(toks):
    tok = toks["gemma"]
    conv = [S("Be brief."), U("Q"), A("A")]
    with pytest.raises(TunesmithError) as info:
        tokenize_conversation(tok, conv, where="train.jsonl:3")
    msg = str(info.value)
    assert msg.startswith("train.jsonl:3: ")
    assert "System role not supported" in msg  # the template's own reason
    assert "system role" in msg  # the explanation: the template has no system role
    assert "drop the system messages" in msg and "fold them into the first user message" in msg
    assert "data.chat_template" in msg
    with pytest.raises(TunesmithError, match="System role not supported"):
        label_characters(tok, conv)


def test_gemma_without_system_message_works(toks):
    tok = toks["gemma"]
    ex = tokenize_conversation(tok, [U("Be brief. Q"), A("A")])
    assert supervised_text(tok, ex) == "A<end_of_turn>"


def test_mistral_system_message_raises(toks):
    # Mistral v0.2's template checks alternation before roles; the message still gives the system advice.
    with pytest.raises(TunesmithError, match="roles must alternate") as err:
        tokenize_conversation(toks["mistral"], [S("Be brief."), U("Q"), A("A")])
    assert "fold them into the first user message" in str(err.value)


# ---------------------------------------------------------------------------------------------
# pad == eos: the end of turn must still be learned

PAD_EOS_CASES = [
    ("multi", CONV, 3),
    ("two_turns", [U("Q1"), A("A1"), U("Q2"), A("A2")], 2),
    ("single", [U("Q"), A("A")], 1),
    ("zh", ZH_CONV, 2),
    ("trim", TRIM_CONV, 2),
]


@pytest.mark.parametrize("mode", ["all_assistant", "last_assistant"])
@pytest.mark.parametrize("family", ALL)
def test_pad_equals_eos_end_of_turn_is_supervised(toks, family, mode):
    tok = toks[family]
    assert tok.pad_token_id == tok.eos_token_id
    eot = tok.convert_tokens_to_ids(FAMILIES[family]["end"])
    assert tok.convert_ids_to_tokens(eot) == FAMILIES[family]["end"]
    for name, conv, n_answers in PAD_EOS_CASES:
        ex = tokenize_conversation(tok, conv, train_on=mode)
        sup = supervised_ids(ex)
        assert sup[-1] == eot, (name, tok.decode(sup))
        # the last supervised token is the end of turn, and nothing after it is supervised
        last_sup = max(i for i, label in enumerate(ex.labels) if label != IGNORE_INDEX)
        assert ex.input_ids[last_sup] == eot
        assert ex.categories[last_sup] == END_OF_TURN
        # one supervised end-of-turn per trained answer
        expected_turns = n_answers if mode == "all_assistant" else 1
        assert sup.count(eot) == expected_turns, name
        if family != "mistral":  # user turns end with the same marker there, and it is never trained
            assert ex.input_ids.count(eot) > sup.count(eot)


def test_chatml_pad_is_eos_in_smollm2(base_tok):
    assert base_tok.pad_token == base_tok.eos_token == "<|im_end|>"


# ---------------------------------------------------------------------------------------------
# categories (for `data inspect`)


def test_chatml_categories(toks):
    tok = toks["chatml"]
    conv = [S("Be brief."), U("Q1"), A("A1"), U("Q2"), A("A2")]
    ex = tokenize_conversation(tok, conv)
    pieces = tok.convert_ids_to_tokens(ex.input_ids)
    by_cat = {}
    for piece, cat, label in zip(pieces, ex.categories, ex.labels):
        by_cat.setdefault(cat, []).append((piece, label != IGNORE_INDEX))
    assert [p for p, _ in by_cat[SYSTEM]] == ["Be", "Ġbrief", "."]
    assert [p for p, _ in by_cat[USER]] == ["Q", "1", "Q", "2"]
    assert [p for p, _ in by_cat[ASSISTANT]] == ["A", "1", "A", "2"]
    assert by_cat[END_OF_TURN] == [("<|im_end|>", True), ("<|im_end|>", True)]
    assert all(sup for _, sup in by_cat[ASSISTANT])
    assert not any(sup for cat in (SYSTEM, USER, TEMPLATE) for _, sup in by_cat[cat])


# ---------------------------------------------------------------------------------------------
# truncation


def test_truncation_drop_and_truncate(toks):
    tok = toks["chatml"]
    full_ids = tok(FULL["chatml"], add_special_tokens=False)["input_ids"]
    n = len(full_ids)
    whole = tokenize_conversation(tok, CONV, max_length=n, truncation="drop")
    assert whole is not None and not whole.truncated and whole.input_ids == full_ids

    assert tokenize_conversation(tok, CONV, max_length=n - 1, truncation="drop") is None

    cut = tokenize_conversation(tok, CONV, max_length=n - 1, truncation="truncate")
    assert cut.truncated and len(cut.input_ids) == n - 1
    assert cut.input_ids == full_ids[: n - 1]
    assert cut.labels == whole.labels[: n - 1] and cut.categories == whole.categories[: n - 1]
    check_invariants(cut)
    # only the final "\n" was cut, and it is not trained
    assert supervised_text(tok, cut) == SUPERVISED["chatml"]["all_assistant"]


def test_truncation_inside_the_conversation(toks):
    tok = toks["chatml"]
    upto_first_answer = (
        SMOL_DEFAULT_SYSTEM + "<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\nHello! How can I help?<|im_end|>"
    )
    k = len(tok(upto_first_answer, add_special_tokens=False)["input_ids"])
    ex = tokenize_conversation(tok, CONV, max_length=k, truncation="truncate")
    assert ex.truncated and len(ex.input_ids) == k
    assert supervised_text(tok, ex) == "Hello! How can I help?<|im_end|>"
    # one token fewer cuts off the end of turn
    ex = tokenize_conversation(tok, CONV, max_length=k - 1, truncation="truncate")
    assert supervised_text(tok, ex) == "Hello! How can I help?"
    # cut inside the prompt: nothing left to learn (prepare_data drops such examples)
    ex = tokenize_conversation(tok, CONV, max_length=10, truncation="truncate")
    assert ex.truncated and len(ex.input_ids) == 10 and ex.num_supervised == 0


@pytest.mark.parametrize("family", ["llama3", "gemma"])
def test_truncation_last_assistant_other_families(toks, family):
    tok = toks[family]
    n = len(tok(FULL[family], add_special_tokens=False)["input_ids"])
    assert tokenize_conversation(tok, CONV, "last_assistant", max_length=n - 1, truncation="drop") is None
    ex = tokenize_conversation(tok, CONV, "last_assistant", max_length=n + 5, truncation="drop")
    assert not ex.truncated and supervised_text(tok, ex) == SUPERVISED[family]["last_assistant"]


# ---------------------------------------------------------------------------------------------
# control tokens that are not special in the vocabulary: masking still works on characters


def test_llama3_raw_vocab_masks_by_character(raw_tok):
    tok = raw_tok("llama3")
    conv = [U("Q1"), A("A1"), U("Q2"), A("A2")]
    # The SmolLM2 bos is "<|im_start|>"; "<|eot_id|>" etc. are ordinary text here.
    assert render(tok, conv) == (
        "<|im_start|><|start_header_id|>user<|end_header_id|>\n\nQ1<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nA1<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nQ2<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nA2<|eot_id|>"
    )
    chars = label_characters(tok, conv)
    trained = "".join(c for c, t in zip(chars.text, chars.trained) if t)
    assert trained == "A1<|eot_id|>A2<|eot_id|>"
    ex = tokenize_conversation(tok, conv)
    check_invariants(ex)
    # The BPE token for "><" joins the end of the first <|eot_id|> and the start of the next header. It has a
    # trained character, so it carries loss, and the decoded text picks up that extra "<".
    assert supervised_text(tok, ex) == "A1<|eot_id|><A2<|eot_id|>"
    assert supervised_text(tok, tokenize_conversation(tok, conv, "last_assistant")) == "A2<|eot_id|>"


@pytest.mark.parametrize("family", ["mistral", "gemma"])
def test_raw_vocab_last_answer(raw_tok, family):
    tok = raw_tok(family)
    conv = [U("Q1"), A("A1"), U("Q2"), A("A2")]
    end = {"mistral": "<|im_end|>", "gemma": "<end_of_turn>"}[family]  # SmolLM2's eos is <|im_end|>
    assert supervised_text(tok, tokenize_conversation(tok, conv, "last_assistant")) == "A2" + end
