"""Data: every record format renders with the right loss mask (token by token); bad data is named."""

from __future__ import annotations

import json

import pytest
import torch

from llm_modules.training.data import (
    DataError,
    DataOptions,
    PaddingCollator,
    build_examples,
    prepare_data,
    split_examples,
)

SYSTEM, QUESTION, ANSWER = "Be brief.", "What is 2 + 3?", "2 + 3 = 5. #### 5"
FOLLOW_UP, ANSWER2 = "And 4 + 4?", "It is 8."

RECORDS = {
    "stratos": {"system": SYSTEM, "conversations": [{"from": "user", "value": QUESTION}, {"from": "assistant", "value": ANSWER}]},
    "sharegpt": {"conversations": [{"from": "system", "value": SYSTEM}, {"from": "human", "value": QUESTION},
                                   {"from": "gpt", "value": ANSWER}, {"from": "human", "value": FOLLOW_UP},
                                   {"from": "gpt", "value": ANSWER2}]},
    "messages": {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION},
                              {"role": "assistant", "content": ANSWER}, {"role": "user", "content": FOLLOW_UP},
                              {"role": "assistant", "content": ANSWER2}]},
    "prompt_completion": {"prompt": QUESTION, "completion": ANSWER},
    "prompt_completion_chat": {"prompt": [{"role": "user", "content": QUESTION}],
                               "completion": [{"role": "assistant", "content": ANSWER}]},
    "gsm8k": {"question": QUESTION, "answer": ANSWER},
}
ASSISTANT_TEXTS = {
    "stratos": [ANSWER], "sharegpt": [ANSWER, ANSWER2], "messages": [ANSWER, ANSWER2],
    "prompt_completion": [ANSWER], "prompt_completion_chat": [ANSWER], "gsm8k": [ANSWER],
}


def write_jsonl(path, rows, raw_lines=()):
    with open(path, "wb") as handle:
        for row in rows:
            handle.write(json.dumps(row).encode() + b"\n")
        for line in raw_lines:
            handle.write(line + b"\n")
    return path


def one(tmp_path, tokenizer, record, **options):
    path = write_jsonl(tmp_path / "data.jsonl", [record])
    examples, report = build_examples(path, tokenizer, DataOptions(**options))
    assert report.used == 1
    return examples[0]


def trained(example):
    return [i for i, label in zip(example["input_ids"], example["labels"]) if label != -100]


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_chat_template_mask_matches_generation_markers_token_by_token(tmp_path, tokenizer, name):
    example = one(tmp_path, tokenizer, RECORDS[name])
    # Oracle: the tiny ChatML template marks assistant text with {% generation %}; HF computes that mask.
    from llm_modules.training.data import to_messages, Record

    messages = to_messages(Record("x", RECORDS[name]), "sharegpt" if "conversations" in RECORDS[name] else
                           "messages" if "messages" in RECORDS[name] else
                           "gsm8k" if "question" in RECORDS[name] else "prompt_completion")
    oracle = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert example["input_ids"] == list(oracle["input_ids"])
    expected = [i if m else -100 for i, m in zip(oracle["input_ids"], oracle["assistant_masks"])]
    assert example["labels"] == expected
    # And in words: the trained tokens are exactly the assistant turns with their end-of-turn marker.
    assert tokenizer.decode(trained(example)) == "".join(t + "<|im_end|>" for t in ASSISTANT_TEXTS[name])


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_plain_template_trains_assistant_turns_and_eos_only(tmp_path, tokenizer, name):
    example = one(tmp_path, tokenizer, RECORDS[name], template="plain")
    text = tokenizer.decode(example["input_ids"])
    assert text.startswith("System:\n\nBe brief.\n\nUser:\n\n" if name in ("stratos", "sharegpt", "messages") else "User:\n\n")
    assert text.endswith(ASSISTANT_TEXTS[name][-1] + "\n\n<|eos|>")
    expected = "\n\n".join(ASSISTANT_TEXTS[name]) + "\n\n<|eos|>"
    assert tokenizer.decode(trained(example)) == expected
    # Token by token: every token is either trained with its own id or ignored, and headers are ignored.
    for token, label in zip(example["input_ids"], example["labels"]):
        assert label in (token, -100)
        if tokenizer.decode([token]) in ("User", "Assistant", "System"):
            assert label == -100


def test_paper_recipe_trains_every_token_without_eos(tmp_path, tokenizer):
    example = one(tmp_path, tokenizer, RECORDS["stratos"], template="plain", loss_on="all", append_eos=False)
    assert example["labels"] == example["input_ids"]
    assert tokenizer.decode(example["input_ids"]) == f"System:\n\n{SYSTEM}\n\nUser:\n\n{QUESTION}\n\nAssistant:\n\n{ANSWER}\n\n"


def test_plain_text_trains_every_token_and_default_system_prompt_is_added(tmp_path, tokenizer):
    example = one(tmp_path, tokenizer, {"text": "The quick brown fox."})
    assert example["labels"] == example["input_ids"] and tokenizer.decode(example["input_ids"]) == "The quick brown fox."
    example = one(tmp_path, tokenizer, RECORDS["gsm8k"], template="plain", system_prompt="Think.")
    assert tokenizer.decode(example["input_ids"]).startswith("System:\n\nThink.\n\nUser:")


def test_json_and_parquet_files_read_like_jsonl(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [RECORDS["gsm8k"], {"question": "1 + 1?", "answer": "#### 2"}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    a, _ = build_examples(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer)
    b, _ = build_examples(tmp_path / "d.json", tokenizer)
    c, _ = build_examples(tmp_path / "d.parquet", tokenizer)
    assert [e["input_ids"] for e in a] == [e["input_ids"] for e in b] == [e["input_ids"] for e in c]
    assert c[1]["row"].endswith("d.parquet:2")


@pytest.mark.parametrize(
    "row,field,words",
    [
        ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt"}]}, "conversations[1].value", "missing"),
        ({"conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "x"}]},
         "conversations[1].from", "unknown role 'robot'"),
        ({"conversations": []}, "conversations", "empty conversation"),
        ({"conversations": [{"from": "human", "value": "hi"}]}, "sharegpt", "no assistant turn"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                       {"role": "system", "content": "late"}]}, "messages", "system message may only come first"),
        ({"question": "hi"}, "answer", "is missing"),
        ({"question": "hi", "answer": 5}, "answer", "expected a string, got int"),
    ],
)
def test_bad_rows_name_file_row_and_field(tmp_path, tokenizer, row, field, words):
    good = RECORDS["sharegpt"] if "conversations" in row else RECORDS["messages"] if "messages" in row else RECORDS["gsm8k"]
    path = write_jsonl(tmp_path / "bad.jsonl", [good, row])
    with pytest.raises(DataError) as caught:
        build_examples(path, tokenizer)
    message = str(caught.value)
    assert f"{path}:2" in message and words in message
    if field:
        assert f"field '{field}'" in message


def test_non_utf8_and_broken_json_lines_are_errors_or_counted_skips(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "mixed.jsonl", [RECORDS["gsm8k"]] * 2, raw_lines=[b'{"question": "caf\xe9"}', b"{oops"])
    with pytest.raises(DataError, match=rf"{path}:3: is not valid UTF-8"):
        build_examples(path, tokenizer)
    examples, report = build_examples(path, tokenizer, DataOptions(on_bad_row="skip"))
    assert len(examples) == 2 and report.rows == 4
    assert report.skipped == {"not UTF-8": 1, "not JSON": 1}
    assert report.examples["not UTF-8"] == [f"{path}:3"] and f"{path}:4" in report.summary()


def test_length_filter_drops_or_truncates_with_counts(tmp_path, tokenizer):
    long = {"question": "hi", "answer": "word " * 200}
    path = write_jsonl(tmp_path / "len.jsonl", [RECORDS["gsm8k"], long])
    examples, report = build_examples(path, tokenizer, DataOptions(max_length=64))
    assert len(examples) == 1 and report.skipped == {"longer than max_length=64": 1}
    assert report.examples["longer than max_length=64"] == [f"{path}:2"]
    examples, report = build_examples(path, tokenizer, DataOptions(max_length=64, overlength="truncate"))
    assert len(examples) == 2 and report.truncated == 1 and len(examples[1]["input_ids"]) == 64
    with pytest.raises(DataError, match=r"all 2 rows are over max_length=8 .*overlength: truncate"):
        build_examples(path, tokenizer, DataOptions(max_length=8))


def test_truncation_that_cuts_every_assistant_token_is_counted(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "cut.jsonl", [RECORDS["gsm8k"], {"question": "long " * 80, "answer": "5"}])
    examples, report = build_examples(path, tokenizer, DataOptions(max_length=40, overlength="truncate"))
    assert len(examples) == 1 and sum(report.skipped.values()) == 1
    assert "no trainable token" in report.summary() and f"{path}:2" in report.summary()


def test_missing_file_and_folder_give_clear_errors(tmp_path, tokenizer):
    with pytest.raises(DataError, match="no such file"):
        build_examples(tmp_path / "nope.jsonl", tokenizer)
    with pytest.raises(DataError, match="is a folder"):
        build_examples(tmp_path, tokenizer)


def test_split_is_deterministic_disjoint_and_keeps_duplicates_together(tokenizer):
    examples = [{"input_ids": [i % 37, i], "labels": [i % 37, i], "row": f"f:{i}"} for i in range(100)]
    examples += [dict(examples[0], row="f:dup")]  # a duplicate of row 0
    train, val = split_examples(examples, 0.1, seed=3)
    again_train, again_val = split_examples(examples, 0.1, seed=3)
    assert [e["row"] for e in val] == [e["row"] for e in again_val] and len(val) == 11
    assert [e["row"] for e in train] == [e["row"] for e in again_train]
    val_ids = {tuple(e["input_ids"]) for e in val}
    assert not any(tuple(e["input_ids"]) in val_ids for e in train)  # no leak, duplicates included
    assert len(train) + len(val) == len(examples)
    _, other = split_examples(examples, 0.1, seed=4)
    assert {e["row"] for e in other} != {e["row"] for e in val}


def test_prepare_data_reports_split_and_fingerprint(tmp_path, tokenizer):
    rows = [{"question": f"What is {i} + {i}?", "answer": f"#### {2 * i}"} for i in range(20)]
    path = write_jsonl(tmp_path / "g.jsonl", rows)
    data = prepare_data(path, tokenizer, validation=0.2, seed=0)
    assert (len(data.train), len(data.validation)) == (16, 4) and data.report.train == 16
    assert prepare_data(path, tokenizer, validation=0.2, seed=0).fingerprint == data.fingerprint
    assert prepare_data(path, tokenizer, DataOptions(template="plain"), validation=0.2).fingerprint != data.fingerprint


def test_collator_pads_right_with_masked_labels():
    batch = PaddingCollator(pad_token_id=0)([
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "source_states": torch.ones(3, 4)},
        {"input_ids": [8], "labels": [8], "source_states": torch.full((1, 4), 2.0)},
    ])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["source_states"].shape == (2, 3, 4) and batch["source_states"][1, 1:].abs().sum() == 0


@pytest.mark.parametrize("template, append_eos, expected", [
    ("chat", True, "<|im_end|>"), ("plain", True, "<|eos|>"), ("plain", False, ""), ("raw", True, "<|eos|>"),
])
def test_end_of_turn_is_what_the_rendering_writes_after_a_reply(tokenizer, template, append_eos, expected):
    from llm_modules.training.data import Renderer

    assert Renderer(tokenizer, template, append_eos).end_of_turn() == expected
