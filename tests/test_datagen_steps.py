"""evol, augment, dedup, filter and select: their rules on fixed strings, each step against a scripted endpoint
or a tiny model, reports that count every drop, and bad inputs as one-line errors that leave no output."""
from __future__ import annotations

import hashlib
import json
import math

from datagen_endpoint import ScriptedEndpoint
from helpers import fails, invoke, ok, write_jsonl

from tunesmith.data.formats import to_conversation
from tunesmith.data.loading import load_rows
from tunesmith.datagen import rules
from tunesmith.datagen.augment import AugmentOptions, augment
from tunesmith.datagen.dedup import DedupOptions, dedup
from tunesmith.datagen.evol import EvolOptions, evol
from tunesmith.datagen.filtering import FilterOptions, filter_file
from tunesmith.datagen.selection import SelectOptions, select
from tunesmith.datagen.teachers import TeacherSpec, make_teacher

TOPICS = ("painter", "bridge", "river", "novel")
ROWS = [{"id": t, "instruction": f"Name a famous {t} and say why it matters.", "output": f"The best known {t} is X."}
        for t in TOPICS]


def _hash(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _teacher(url):
    return make_teacher(TeacherSpec(url, model="m", backoff=0.001, retries=1))


def test_evol_elimination_rules():
    assert rules.evolved_problem("a", "#Rewritten Prompt#: do more") == "copies words of the evolving prompt (prompt leakage)"
    assert rules.evolved_problem("Do it.", "Do it.") == "no information gain (unchanged)"
    assert rules.evolved_problem("Do it.", "Do it twice, in French.") is None
    assert rules.answer_problem("Sorry, I cannot do that.").startswith("answer says 'sorry'")
    assert rules.answer_problem("Sorry " + "word " * 80) is None  # long answers may apologise
    assert rules.answer_problem("It is, and there it was!") == "answer is only punctuation and stop words"
    assert rules.answer_problem("Paris is the capital.") is None


def _evol_answers(calls: dict):
    def answer(text: str, body: dict) -> str:
        if text.startswith(("You rewrite", "Draw inspiration")):
            prompt = text.split("Prompt:\n", 1)[1]
            if "painter" in prompt:
                return "#Rewritten Prompt#: " + prompt  # leaks the template: eliminated every round
            return prompt + " Answer in exactly three sentences."
        if text.startswith("Are these two instructions equal"):
            return "Not Equal"
        calls["bridge"] = calls.get("bridge", 0) + ("bridge" in text)
        if "bridge" in text and calls["bridge"] == 1:
            return "Sorry, I can't."
        return "A detailed answer about " + text[:30]
    return answer


def test_evol_rounds_eliminate_and_return_failures_to_the_pool_and_resume(tmp_path):
    seeds = write_jsonl(tmp_path / "seeds.jsonl", ROWS)
    out = tmp_path / "evol.jsonl"
    with ScriptedEndpoint(_evol_answers({})) as ep:
        report = evol(seeds, out, _teacher(ep.url), EvolOptions(rounds=2))
        rewrites = [r["messages"][0]["content"] for r in ep.chat_requests()
                    if r["messages"][0]["content"].startswith(("You rewrite", "Draw inspiration"))]
        first = out.read_text()
        n_before = len(ep.chat_requests())
        again = evol(seeds, out, _teacher(ep.url), EvolOptions(rounds=2))  # a rerun redoes only what failed
        retried = ep.chat_requests()[n_before:]
    rows = {r["id"]: r for r in _lines(out)}
    assert set(rows) == {"evol-river-r1", "evol-novel-r1", "evol-river-r2", "evol-novel-r2", "evol-bridge-r2"}
    assert report.dropped == {"copies words of the evolving prompt (prompt leakage)": 2,
                              "answer says 'sorry' and is short (under 80 words)": 1}
    bridge_round2 = [t for t in rewrites if "bridge" in t][1]
    assert bridge_round2.endswith("Prompt:\n" + ROWS[1]["instruction"])  # the failed one came back unchanged
    assert rows["evol-river-r2"]["instruction"].count("three sentences") == 2  # round 2 evolved round 1's text
    assert rows["evol-river-r2"]["provenance"]["round"] == 2 and rows["evol-river-r2"]["provenance"]["source_ids"] == ["river"]
    assert out.read_text() == first and again.resumed == 5 and again.rows_out == 5
    assert len(retried) == 2 and all("painter" in r["messages"][0]["content"] for r in retried)


def test_augment_operators_link_to_their_originals(tmp_path):
    def answer(text: str, body: dict) -> str:
        if text.startswith("Paraphrase"):
            return "Please tell me: " + text.split("Instruction:\n", 1)[1]
        if text.startswith("Translate the following text into French"):
            return "[fr] " + text.split("Text:\n", 1)[1]
        if text.startswith("Translate the following text into English"):
            return "Back: " + text.split("Text:\n", 1)[1].removeprefix("[fr] ")
        if "novel" in text:
            return text.split("Answer:\n", 1)[1]  # unchanged: dropped
        return "Step 1: recall. Step 2: " + text.split("Answer:\n", 1)[1]
    data = write_jsonl(tmp_path / "data.jsonl", ROWS)
    out = tmp_path / "aug.jsonl"
    with ScriptedEndpoint(answer) as ep:
        report = augment(data, out, _teacher(ep.url), AugmentOptions(ops=("paraphrase", "backtranslate", "cot")))
    rows = {r["id"]: r for r in _lines(out)}
    assert len(rows) == 11 and report.dropped == {"cot: unchanged": 1}
    assert rows["river-paraphrase"]["instruction"].startswith("Please tell me: Name a famous river")
    assert rows["river-paraphrase"]["output"] == ROWS[2]["output"]
    assert rows["river-backtranslate"]["instruction"] == "Back: " + ROWS[2]["instruction"]
    assert rows["river-cot"]["output"].startswith("Step 1") and rows["river-cot"]["instruction"] == ROWS[2]["instruction"]
    assert rows["river-cot"]["provenance"]["source_ids"] == ["river"] and rows["river-cot"]["provenance"]["operator"] == "cot"


def test_dedup_exact_and_near_duplicates_keep_the_first(tmp_path):
    long = ("Explain how a suspension bridge carries its load from the deck through the hangers into the main "
            "cables and then down into the towers and anchorages at each end of the span, why engineers add "
            "stiffening trusses against wind, how the cables are spun on site wire by wire, and what limits the "
            "longest spans built so far across the world, with two well known examples and their lengths in metres")
    near = long.replace("in metres", "in feet")
    words_a, words_b = long.lower().split(), near.lower().split()
    shingles = [{" ".join(w[i:i + 3]) for i in range(len(w) - 2)} for w in (words_a, words_b)]
    assert len(shingles[0] & shingles[1]) / len(shingles[0] | shingles[1]) > 0.8  # truly near (exact Jaccard)
    rows = [{"id": "a", "instruction": long, "output": "x"},
            {"id": "b", "instruction": long.upper() + "!!", "output": "X"},  # same after normalising
            {"id": "c", "instruction": near, "output": "x"},
            {"id": "d", "instruction": "Write a haiku about the first snow of winter.", "output": "x"}]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    before = _hash(data)
    report = dedup(data, tmp_path / "dd.jsonl", DedupOptions(threshold=0.8, shingle=3))
    assert [r["id"] for r in _lines(tmp_path / "dd.jsonl")] == ["a", "d"]
    assert report.extra["cluster_members"] == {"a": ["b", "c"]}
    assert report.dropped == {"exact duplicate (normalised text)": 1, "near duplicate (Jaccard >= 0.8)": 1}
    assert _hash(data) == before
    report = dedup(data, tmp_path / "dd2.jsonl", DedupOptions(threshold=0.95, shingle=3))
    assert [r["id"] for r in _lines(tmp_path / "dd2.jsonl")] == ["a", "c", "d"]  # below a stricter threshold


def test_near_duplicates_are_decided_by_exact_jaccard_just_above_and_below_the_threshold(tmp_path):
    """Word shingles (size 1); each row's set also holds the field-break marker of its empty input and output.
    Above: 19 words vs the same with the last 2 replaced: 17 + 1 shared, 19 + 1 + 2 in the union: 18/22 = 0.818.
    Below: 16 words, last 2 replaced: 14 + 1 shared, 16 + 1 + 2 in the union: 15/19 = 0.789.
    At: 17 words, last 2 replaced: 15 + 1 shared, 17 + 1 + 2 in the union: 16/20 = 0.8 exactly (a duplicate at 0.8).
    MinHash (128 permutations) estimates the three at 0.789, 0.8125 and 0.789, on the wrong side of 0.8 each time,
    and an LSH built at 0.8 does not even offer the last pair as a candidate."""
    above = "brick queen igloo bread zebra river apple chair mango umbrella xylophone piano kite house yacht lemon night"
    below = "drum river water zebra tiger eagle jelly dance chair kite piano cloud brick lemon"
    at = "stone brick zebra yacht chair igloo dance piano ocean water mango grape xylophone umbrella apple"
    rows = [{"id": "above", "instruction": above + " amber dance"}, {"id": "above-2", "instruction": above + " jelly grape"},
            {"id": "below", "instruction": below + " night flame"}, {"id": "below-2", "instruction": below + " stone queen"},
            {"id": "at", "instruction": at + " violin night"}, {"id": "at-2", "instruction": at + " lemon drum"}]
    for row in rows:
        row["output"] = ""
    assert [len(set(rows[i]["instruction"].split())) for i in (0, 2, 4)] == [19, 16, 17]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    report = dedup(data, tmp_path / "dd.jsonl", DedupOptions(threshold=0.8, shingle=1))
    assert [r["id"] for r in _lines(tmp_path / "dd.jsonl")] == ["above", "below", "below-2", "at"]
    assert report.extra["cluster_members"] == {"above": ["above-2"], "at": ["at-2"]}
    report = dedup(data, tmp_path / "dd2.jsonl", DedupOptions(threshold=0.79, shingle=1))  # 0.789 < 0.79 still
    assert [r["id"] for r in _lines(tmp_path / "dd2.jsonl")] == ["above", "below", "below-2", "at"]
    report = dedup(data, tmp_path / "dd3.jsonl", DedupOptions(threshold=0.78, shingle=1))
    assert [r["id"] for r in _lines(tmp_path / "dd3.jsonl")] == ["above", "below", "at"]


def test_cleaning_steps_append_their_record_to_the_provenance(tmp_path, tiny_model_dir, tokenizer):
    from tunesmith.models import load_model

    generated = {"step": "evol", "operator": "deepen", "round": 1, "teacher": "t", "source_ids": ["seed-1"]}
    rows = [{"id": "g", "instruction": "Name a famous painter and one work.", "output": "Monet painted water lilies.",
             "provenance": generated},
            {"id": "g2", "instruction": "Name a famous painter and one work.", "output": "Monet painted water lilies."},
            {"id": "h", "instruction": "List two prime numbers below ten.", "output": "Two and seven are prime."}]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    dedup(data, tmp_path / "d.jsonl")
    filter_file(tmp_path / "d.jsonl", tmp_path / "f.jsonl", tokenizer=tokenizer)
    select(tmp_path / "f.jsonl", tmp_path / "s.jsonl", SelectOptions(n=2, max_ifd=100.0),
           loaded=(load_model(str(tiny_model_dir)).eval(), tokenizer))
    final = {r["id"]: r["provenance"] for r in _lines(tmp_path / "s.jsonl")}
    assert set(final) == {"g", "h"}
    g = final["g"]
    assert (g["step"], g["operator"], g["source_ids"]) == ("select", "ifd", ["g"])
    assert [h["step"] for h in g["history"]] == ["evol", "dedup", "filter"]
    assert g["history"][0] == generated and g["history"][1]["duplicates"] == ["g2"]
    assert [h["step"] for h in final["h"]["history"]] == ["dedup", "filter"]  # a hand-written row starts at dedup
    assert "history" not in g["history"][1] and "history" not in g["history"][2]


def test_filter_gives_a_reason_per_dropped_row(tmp_path, tokenizer):
    rows = [
        {"id": "good", "instruction": "Name a colour.", "output": "Blue is a calm colour."},
        {"id": "empty", "instruction": "Name a colour.", "output": "   "},
        {"id": "refusal", "instruction": "Name a colour.", "output": "I'm sorry, but I cannot help with that."},
        {"id": "russian", "instruction": "Назови цвет.", "output": "Синий цвет."},
        {"id": "copy", "instruction": "Name a colour that you like.", "output": "Name a colour that you like."},
        {"id": "long", "instruction": "Describe the sea.", "output": "The sea is wide and deep. " * 30},
        {"id": "history", "instruction": "Name a colour.", "output": "Red.", "history": ["not a pair"]},
    ]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    report = filter_file(data, tmp_path / "f.jsonl", FilterOptions(max_tokens=60), tokenizer=tokenizer)
    assert [r["id"] for r in _lines(tmp_path / "f.jsonl")] == ["good"]
    reasons = {d["id"]: d["reason"] for d in report.extra["dropped_rows"]}
    assert reasons["empty"] == "empty answer" and reasons["refusal"] == "refusal answer"
    assert reasons["russian"].startswith("not English") and reasons["copy"].startswith("answer copies")
    assert reasons["long"] == "over 60 tokens" and reasons["history"].startswith("rejected by the data loader")
    assert sum(report.dropped.values()) == 6


def _reference_ifd(model, tokenizer, instruction: str, answer: str) -> float:
    """Plain PyTorch: log-softmax over the whole sequence, answer positions summed by hand."""
    import torch

    prompt = tokenizer.apply_chat_template([{"role": "user", "content": instruction}], tokenize=False,
                                           add_generation_prompt=True)
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    a_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]

    def mean_nll(prefix):
        ids = torch.tensor([prefix + a_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
        return -sum(logp[len(prefix) + i - 1, t].item() for i, t in enumerate(a_ids)) / len(a_ids)

    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return math.exp(mean_nll(p_ids)) / math.exp(mean_nll([start]))


def test_select_ranks_by_ifd_with_a_diversity_constraint(tmp_path, tiny_model_dir, tokenizer):
    from tunesmith.models import load_model

    model = load_model(str(tiny_model_dir)).eval()
    rows = [{"id": "a", "instruction": "Name a famous painter.", "output": "Claude Monet painted water lilies."},
            {"id": "b", "instruction": "Name a famous painter.", "output": "Frida Kahlo painted portraits."},
            {"id": "c", "instruction": "List two prime numbers.", "output": "Two and three are prime."},
            {"id": "d", "instruction": "Give a synonym of happy.", "output": "Joyful."}]
    ref = {r["id"]: _reference_ifd(model, tokenizer, r["instruction"], r["output"]) for r in rows}
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    report = select(data, tmp_path / "sel.jsonl", SelectOptions(n=2, max_ifd=100.0), loaded=(model, tokenizer))
    kept = _lines(tmp_path / "sel.jsonl")
    by_ifd = sorted(ref, key=lambda k: -ref[k])
    painter_first = next(k for k in by_ifd if k in "ab")
    expected = [k for k in by_ifd if k not in "ab" or k == painter_first][:2]  # a and b share the instruction
    assert [r["id"] for r in kept] == expected
    for r in kept:
        assert abs(r["scores"]["ifd"] - ref[r["id"]]) < 1e-4
    assert sum(report.dropped.values()) == 2
    report = select(data, tmp_path / "sel2.jsonl", SelectOptions(n=4, max_ifd=min(ref.values()) + 1e-9),
                    loaded=(model, tokenizer))
    assert [r["id"] for r in _lines(tmp_path / "sel2.jsonl")] == [min(ref, key=ref.get)]


def test_outputs_load_with_tunesmiths_loader_and_cli_bad_inputs(tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", ROWS + [dict(ROWS[0], id="dup")])
    before = _hash(data)
    out = ok(invoke("datagen", "dedup", data, "--out", tmp_path / "d.jsonl"))
    assert "dedup: 5 rows in, 4 out" in out and "exact duplicate" in out
    for row in load_rows(str(tmp_path / "d.jsonl")):
        to_conversation(row, "auto")
    fails(invoke("datagen", "dedup", data, "--out", data), "is the input file")
    fails(invoke("datagen", "dedup", data, "--out", tmp_path / "x.jsonl", "--threshold", 1.5), "--threshold")
    fails(invoke("datagen", "filter", data, "--out", tmp_path / "x.jsonl", "--language", "xx"), "--language 'xx'")
    fails(invoke("datagen", "select", data, "--out", tmp_path / "x.jsonl", "--n", 0), "--n must be at least 1")
    fails(invoke("datagen", "augment", data, "--out", tmp_path / "x.jsonl", "--ops", "shout"), "--ops 'shout'")
    no_output = write_jsonl(tmp_path / "noout.jsonl", [{"instruction": "a"}])
    fails(invoke("datagen", "filter", no_output, "--out", tmp_path / "x.jsonl"), "noout.jsonl:1", "no 'output'")
    fails(invoke("datagen", "evol", tmp_path / "missing.jsonl", "--out", tmp_path / "x.jsonl"), "does not exist")
    assert not (tmp_path / "x.jsonl").exists() and _hash(data) == before
