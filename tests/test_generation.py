"""The fast greedy decoder against transformers' own `generate`: the same tokens, row for row, on a tiny random
Llama with a LoRA adapter (PEFT), prompts of different lengths and stop tokens that end rows at different steps."""
from __future__ import annotations

import pytest
import torch

MAX_NEW = 12
CONTENTS = ["Hi", "Book a table for two in Lima on 3 May.", "What is 2 + 2?",
            "Extract the booking as JSON: Ana Silva, Porto, 2025-06-01, 4 guests. Please answer quickly.", "Thanks!"]


@pytest.fixture(scope="module")
def adapted(tiny_model_dir):
    """The tiny model under a PEFT LoRA adapter with random (non-zero) B, as eval loads a run: fp32, eval mode."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=modules, init_lora_weights=False)).eval()


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [tokenizer.apply_chat_template([{"role": "user", "content": c}], tokenize=False, add_generation_prompt=True)
            for c in CONTENTS]


def encode(tokenizer, prompts):
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        return tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side


def reference(model, tokenizer, enc, stops: list[int]) -> list[list[int]]:
    """transformers' greedy `generate`, each row cut after its first stop token (generate pads after it)."""
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=stops,
                             pad_token_id=tokenizer.pad_token_id)
    rows = out[:, enc["input_ids"].shape[1]:].tolist()
    return [row[: next((i + 1 for i, t in enumerate(row) if t in stops), len(row))] for row in rows]


def stop_ending_rows_at_different_steps(rows: list[list[int]]) -> int:
    """A token that some rows produce first at different steps and another row never produces."""
    for token in dict.fromkeys(t for row in rows for t in row):
        firsts = [row.index(token) for row in rows if token in row]
        if len(set(firsts)) >= 2 and len(firsts) < len(rows):
            return token
    raise AssertionError(f"no usable stop token in {rows}")


@pytest.fixture(scope="module")
def case(adapted, tokenizer, prompts):
    """(encoded prompts, stop ids, generate's rows): the stop ends rows at different steps, one row runs to the limit."""
    enc = encode(tokenizer, prompts)
    free = reference(adapted, tokenizer, enc, [tokenizer.eos_token_id])
    stops = [stop_ending_rows_at_different_steps(free), tokenizer.eos_token_id]
    rows = reference(adapted, tokenizer, enc, stops)
    lengths = [len(r) for r in rows]
    assert len(set(lengths)) >= 3 and MAX_NEW in lengths and min(lengths) < MAX_NEW  # the case covers what it says
    return enc, stops, rows


@pytest.mark.parametrize("min_rows", [1, 3, 16])
def test_greedy_decode_matches_generate_token_for_token(adapted, case, min_rows, monkeypatch):
    from tunesmith import generation

    monkeypatch.setattr(generation, "MIN_ROWS", min_rows)  # 1: every ended row leaves; 16: none of these 5 does
    enc, stops, expected = case
    assert len(set(enc["attention_mask"].sum(-1).tolist())) == len(CONTENTS)  # every prompt a different length
    assert generation.greedy_decode(adapted, enc["input_ids"], enc["attention_mask"], MAX_NEW, stops) == expected


@pytest.mark.parametrize("min_rows", [1, 3])
def test_ended_rows_leave_the_batch_down_to_min_rows(adapted, case, min_rows, monkeypatch):
    """After a row emits a stop token, later forwards run on fewer rows (generate decodes padding for it), but
    never on fewer than MIN_ROWS: ended rows fill up to it."""
    from tunesmith import generation

    monkeypatch.setattr(generation, "MIN_ROWS", min_rows)
    enc, stops, expected = case
    batch_sizes = []
    hook = adapted.get_base_model().model.embed_tokens.register_forward_hook(
        lambda module, args, out: batch_sizes.append(args[0].shape[0]))
    try:
        generation.greedy_decode(adapted, enc["input_ids"], enc["attention_mask"], MAX_NEW, stops)
    finally:
        hook.remove()
    # one prefill, then one forward per step while some row still writes
    running = [sum(len(row) > step for row in expected) for step in range(1, max(map(len, expected)))]
    assert batch_sizes == [len(expected)] + [max(n, min_rows) for n in running]
    assert min(running) < 3  # rows end early enough for the floor of 3 to matter


def test_rows_to_keep():
    from tunesmith.generation import rows_to_keep

    ended = torch.tensor([True, False, True, True, False])
    assert rows_to_keep(ended, 1).tolist() == [1, 4]
    assert rows_to_keep(ended, 3).tolist() == [0, 1, 4]
    assert rows_to_keep(ended, 5).tolist() == [0, 1, 2, 3, 4]


def test_generate_batch_answers_as_generate_does(adapted, tokenizer, prompts):
    """The text eval scores: generate's tokens decoded without special tokens, stripped."""
    from tunesmith.inference import generate_batch, stop_token_ids

    stops = stop_token_ids(tokenizer)
    expected = [tokenizer.decode(r, skip_special_tokens=True).strip()
                for r in reference(adapted, tokenizer, encode(tokenizer, prompts), stops)]
    assert generate_batch(adapted, tokenizer, prompts, MAX_NEW) == expected


def test_zero_new_tokens_and_empty_batch(adapted, case):
    from tunesmith.generation import greedy_decode

    enc, stops, _ = case
    assert greedy_decode(adapted, enc["input_ids"], enc["attention_mask"], 0, stops) == [[] for _ in CONTENTS]
    assert greedy_decode(adapted, enc["input_ids"][:0], enc["attention_mask"][:0], 4, stops) == []


def test_common_prefix_leaves_every_row_a_token():
    from tunesmith.inference import common_prefix

    assert common_prefix([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == [1, 2]
    assert common_prefix([[1, 2], [1, 2, 3]]) == [1]  # the shorter row keeps its last token to start from
    assert common_prefix([[4, 5], [6, 5]]) == []


def test_left_padded():
    from tunesmith.inference import left_padded

    ids, mask = left_padded([[5, 6, 7], [8]], pad=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_generate_answers_equal_generate_on_the_callers_batches(adapted, tokenizer, prompts):
    """Sorted by length, the shared start run once, answers back in the given order: still generate's text."""
    from tunesmith.inference import generate_answers, stop_token_ids

    stops = stop_token_ids(tokenizer)
    order = [3, 0, 4, 1, 2]  # not by length, so sorting regroups the batches
    asked = [prompts[i] for i in order]
    expected = [tokenizer.decode(r, skip_special_tokens=True).strip()
                for start in range(0, len(asked), 2)
                for r in reference(adapted, tokenizer, encode(tokenizer, asked[start : start + 2]), stops)]
    progress = []
    assert generate_answers(adapted, tokenizer, asked, MAX_NEW, batch_size=2, on_batch=progress.append) == expected
    assert progress == [2, 2, 1]


def test_the_shared_start_goes_through_the_model_once(adapted, tokenizer, prompts):
    from tunesmith.inference import generate_answers

    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    shared = next(i for i in range(min(map(len, ids))) if len({row[i] for row in ids}) > 1)  # by hand
    assert shared > 5  # the chat template's system turn
    widths = []
    hook = adapted.get_base_model().model.embed_tokens.register_forward_hook(
        lambda module, args, out: widths.append(tuple(args[0].shape)))
    try:
        generate_answers(adapted, tokenizer, prompts, 1, batch_size=5)
    finally:
        hook.remove()
    assert widths == [(1, shared), (5, max(map(len, ids)) - shared)]


def test_decoding_runs_on_the_growing_cache_and_the_lean_lora_forward(adapted, case):
    """Without this, a decoder that silently fell back to DynamicCache and PEFT's forward would pass the rest."""
    from tunesmith.generation import GrowingLayer, greedy_decode

    enc, stops, _ = case
    seen = []
    lora_q = adapted.get_base_model().model.layers[0].self_attn.q_proj

    def spy(module, args, kwargs):
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        seen.append((type(cache.layers[0]), "forward" in vars(lora_q)))

    hook = adapted.get_base_model().model.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        greedy_decode(adapted, enc["input_ids"], enc["attention_mask"], 3, stops)
    finally:
        hook.remove()
    assert seen == [(GrowingLayer, True)] * 3
    assert "forward" not in vars(lora_q)  # PEFT's own forward again afterwards


def test_growing_cache_holds_what_dynamic_cache_holds(tiny_model_dir):
    """Step by step (a prefix broadcast to the rows, a prompt, single tokens, rows leaving) the same keys and
    values as transformers' DynamicCache, written into one buffer that is never reallocated while it grows."""
    from transformers import AutoConfig, DynamicCache

    from tunesmith.generation import GrowingLayer, growing_cache

    config = AutoConfig.from_pretrained(tiny_model_dir)
    layers, heads = config.num_hidden_layers, config.num_key_value_heads
    width = config.hidden_size // config.num_attention_heads
    grown, plain = growing_cache(config, capacity=9), DynamicCache(config=config)
    assert len(grown.layers) == layers and all(type(layer) is GrowingLayer for layer in grown.layers)
    torch.manual_seed(0)
    steps = [torch.randn(1, heads, 3, width).expand(3, -1, -1, -1), torch.randn(3, heads, 4, width),
             torch.randn(3, heads, 1, width), "leave", torch.randn(2, heads, 1, width)]
    for states in steps:
        if isinstance(states, str):
            grown.batch_select_indices(torch.tensor([0, 2]))
            plain.batch_select_indices(torch.tensor([0, 2]))
            buffer = grown.layers[1].key_buffer
            continue
        for index in range(layers):
            got = grown.update(states + index, states - index, index)
            want = plain.update(states + index, states - index, index)
            assert all(torch.equal(g, w) for g, w in zip(got, want))
        assert grown.get_seq_length() == plain.get_seq_length()
    assert grown.layers[1].keys.data_ptr() == buffer.data_ptr()  # a view of the buffer, not a copy
    assert grown.get_seq_length() == 9
    with pytest.raises(RuntimeError, match="9 positions"):
        grown.update(states, states, 0)


def test_a_model_with_sliding_window_layers_keeps_dynamic_cache(tiny_model_dir):
    from transformers import AutoConfig
    from transformers.cache_utils import DynamicSlidingWindowLayer

    from tunesmith.generation import growing_cache

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.layer_types = ["sliding_attention"] * config.num_hidden_layers
    config.sliding_window = 4
    assert {type(layer) for layer in growing_cache(config, 9).layers} == {DynamicSlidingWindowLayer}


@pytest.mark.parametrize("scaling", [2.0, 3.0, 0.5])  # folded into A; multiplied as PEFT does; too small to fold
def test_lean_lora_is_pefts_forward_bit_for_bit_and_goes_away(adapted, scaling):
    from tunesmith.lean_lora import LeanLora, lora_linears

    layers = lora_linears(adapted)
    assert len(layers) == 7 * adapted.config.num_hidden_layers
    saved = [dict(layer.scaling) for layer in layers]
    torch.manual_seed(0)
    ids = torch.randint(0, adapted.config.vocab_size, (3, 9))
    try:
        for layer in layers:
            layer.scaling["default"] = scaling
        with torch.inference_mode():
            want = adapted(input_ids=ids).logits
            with LeanLora(adapted) as lean:
                assert lean.layers == len(layers)
                assert all("forward" in vars(layer) for layer in layers)
                got = adapted(input_ids=ids).logits
    finally:
        for layer, before in zip(layers, saved):
            layer.scaling.update(before)
    assert torch.equal(got, want)
    assert not any("forward" in vars(layer) for layer in layers)


def test_a_power_of_two_scaling_moves_into_a():
    from tunesmith.lean_lora import folded

    a, b = torch.ones(2, 3), torch.ones(3, 2)
    assert folded(a, None, b, None, 4.0)[0].tolist() == [[4.0] * 3] * 2 and folded(a, None, b, None, 4.0)[4] is None
    for kept in [(a, None, b, None, 3.0), (a, None, b, None, 0.25), (a, None, b, torch.ones(3), 2.0)]:
        assert folded(*kept) == kept


def test_lean_lora_leaves_layers_it_would_compute_differently(adapted):
    """Adapters switched off, a forward someone else installed (training's fused LoRA), a hook: PEFT's path."""
    from tunesmith.lean_lora import LeanLora, lora_linears

    with adapted.disable_adapter(), LeanLora(adapted) as lean:
        assert lean.layers == 0
    first, second = lora_linears(adapted)[:2]
    mine = lambda x: x  # noqa: E731
    first.forward = mine
    hook = second.register_forward_hook(lambda *a: None)
    try:
        with LeanLora(adapted) as lean:
            assert lean.layers == len(lora_linears(adapted)) - 2
            assert "forward" not in vars(second)
        assert first.forward is mine
    finally:
        del first.forward
        hook.remove()
