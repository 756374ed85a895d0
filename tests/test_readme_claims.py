"""README statements that a test can hold: each test names the README sentence it keeps true."""
from __future__ import annotations

import json

from conftest import REPO


def _first_booking_row() -> dict:
    with open(REPO / "recipes" / "data" / "booking-train.jsonl", encoding="utf-8") as f:
        return json.loads(f.readline())


def test_trl_completion_mask_supervises_one_token_more_than_ours(tiny_model_dir, tokenizer):
    """README, Speed: 'TRL's completion mask also covers the \\n the template writes after <|im_end|> (39
    instead of 38 supervised tokens on the first booking example)'."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from tunesmith.data.formats import to_conversation
    from tunesmith.data.loading import Row
    from tunesmith.data.masking import tokenize_conversation

    row = _first_booking_row()
    ours = tokenize_conversation(tokenizer, to_conversation(Row(row, "booking-train.jsonl:1"), "alpaca"))
    supervised = [i for i, label in zip(ours.input_ids, ours.labels) if label != -100]

    # The benchmark's TRL setup (bench/sft_throughput.py): prompt/completion messages, TRL's own tokenization.
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": row["instruction"] + "\n\n" + row["input"]}],
                             "completion": [{"role": "assistant", "content": row["output"]}]}])
    args = SFTConfig(output_dir=str(tiny_model_dir.parent / "trl-out"), max_steps=1, report_to=[], use_cpu=True,
                     max_length=512)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), args=args, train_dataset=ds,
                         processing_class=tokenizer)
    example = trainer.train_dataset[0]
    theirs = [label for label in example["labels"] if label != -100]

    assert example["input_ids"] == ours.input_ids  # the same rendered text, token for token
    assert (len(supervised), len(theirs)) == (38, 39)
    assert theirs[:-1] == supervised and supervised[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.decode(theirs[-1:]) == "\n"
