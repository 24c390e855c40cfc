"""Malformed training records, each paired with the reason the data loader must skip it for.

For ``tests/test_hostile_input.py`` (pytest puts ``scripts/`` on ``sys.path``: pyproject.toml) and
``malformed_records.py`` beside this module: every kind of damage a real
dataset arrives with (bytes that are not UTF-8, cut or nested-too-deep JSON, non-objects, missing
fields, wrong types, empty and huge fields, unpaired surrogates, unknown roles, conversations
without a user or an assistant, system turns in the middle), for each record format the loader
reads. A file starts with one good record (it fixes the file's format), then the damaged ones.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass

# reason names as llm_modules/training/data.py counts them
LONG = "longer than max_length={max_length}"


@dataclass(frozen=True)
class Bad:
    """One line of a .jsonl file (bytes, no newline) and the reason it must be skipped for."""

    line: bytes
    reason: str


def _json(value: object) -> bytes:
    return json.dumps(value).encode()


GOOD = {
    "gsm8k": {"question": "What is 2 + 3?", "answer": "2 + 3 = 5. #### 5"},
    "text": {"text": "A small model learns from a large one."},
    "prompt_completion": {"prompt": "What is 2 + 3?", "completion": "5"},
    "sharegpt": {"system": "Be brief.", "conversations": [{"from": "human", "value": "What is 2 + 3?"},
                                                          {"from": "gpt", "value": "5"}]},
    "messages": {"messages": [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]},
}
# the string fields of each format (for wrong types, empty, huge and surrogate values)
TEXT_FIELDS = {"gsm8k": ("question", "answer"), "text": ("text",), "prompt_completion": ("prompt", "completion")}
TURNS = {"sharegpt": ("conversations", "from", "value", "human", "gpt", "system"),
         "messages": ("messages", "role", "content", "user", "assistant", "system")}


def _wrong_value(rng: random.Random) -> object:
    return rng.choice([0, 1.5, True, ["a", "list"], {"an": "object"}, -7, [], {}])


def _common(rng: random.Random, fmt: str) -> Bad:
    """Damage that does not depend on the format."""
    good = json.dumps(GOOD[fmt])
    kind = rng.randrange(6)
    if kind == 0:  # bytes that are not UTF-8 inside a string
        cut = rng.randrange(2, len(good) - 2)
        return Bad(good[:cut].encode() + bytes([rng.choice([0x80, 0xC3, 0xFF, 0xFE, 0xED])]) + good[cut:].encode(),
                   "not UTF-8")
    if kind == 1:  # JSON cut short
        return Bad(good[: rng.randrange(1, len(good) - 1)].encode(), "not JSON")
    if kind == 2:  # nested deeper than any parser's recursion limit
        depth = rng.randrange(100_000, 200_000)
        return Bad(b"[" * depth + b"]" * depth, "not JSON")
    if kind == 3:  # valid JSON, not an object
        return Bad(_json(rng.choice([None, 3, "text", [GOOD[fmt]], [1, 2], 2.5, True])), "not a JSON object")
    if kind == 4:  # whitespace only
        return Bad(rng.choice([b"", b" ", b"\t", b"  \t "]), "blank line")
    required = next(iter(TEXT_FIELDS.get(fmt) or (TURNS[fmt][0],)))
    return Bad(_json({"unrelated": 1, "keys": "here"}), f"missing field: {required}")


def _text_field(rng: random.Random, fmt: str, max_length: int) -> Bad:
    record = dict(GOOD[fmt])
    name = rng.choice(TEXT_FIELDS[fmt])
    kind = rng.randrange(5)
    if kind == 0:
        record[name] = _wrong_value(rng)
        while fmt == "prompt_completion" and isinstance(record[name], list):  # a list there is TRL's turns
            record[name] = _wrong_value(rng)
        return Bad(_json(record), f"wrong type: {name}")
    if kind == 1:
        record[name] = rng.choice(["", " ", "\n\t ", "   "])
        return Bad(_json(record), f"empty field: {name}")
    if kind == 2:
        record[name] = None if rng.random() < 0.5 else record[name]
        if record[name] is not None:
            del record[name]
        return Bad(_json(record), f"missing field: {name}")
    if kind == 3:  # an unpaired surrogate: valid JSON (written as \ud800), not text any encoder can write
        record[name] = "ab" + chr(rng.randrange(0xD800, 0xE000)) + "cd"
        return Bad(_json(record), f"unpaired surrogate: {name}")
    record[name] = "word " * rng.randrange(max_length * 2, max_length * 20)
    return Bad(_json(record), LONG.format(max_length=max_length))


def _turns_field(rng: random.Random, fmt: str, max_length: int) -> Bad:
    key, role_key, content_key, user, assistant, system = TURNS[fmt]
    record = json.loads(json.dumps(GOOD[fmt]))
    turns = record[key]
    kind = rng.randrange(10)
    if kind == 0:
        record[key] = rng.choice(["a string", 5, {"from": "human"}, True])
        return Bad(_json(record), f"wrong type: {key}")
    if kind == 1:
        record[key] = []
        return Bad(_json(record), f"empty field: {key}")
    index = rng.randrange(len(turns))
    if kind == 2:
        turns[index] = rng.choice(["turn", 3, None, [1], True])
        return Bad(_json(record), f"wrong type: {key}[]")
    if kind == 3:
        missing = rng.choice([role_key, content_key])
        del turns[index][missing]
        return Bad(_json(record), f"missing field: {key}[].{missing}")
    if kind == 4:
        turns[index][role_key] = rng.choice(["narrator", "tool?", "", "USER!", "42"])
        return Bad(_json(record), f"unknown role: {key}[].{role_key}")
    if kind == 5:
        turns[index][content_key] = _wrong_value(rng)
        return Bad(_json(record), f"wrong type: {key}[].{content_key}")
    if kind == 6:
        record[key] = [t for t in turns if t[role_key] != assistant]
        return Bad(_json(record), f"no assistant turn: {fmt}")
    if kind == 7:
        record[key] = [t for t in turns if t[role_key] != user]
        return Bad(_json(record), f"no user turn: {fmt}")
    if kind == 8:
        turns.insert(1, {role_key: system, content_key: "Now be verbose."})
        return Bad(_json(record), f"misplaced system turn: {fmt}")
    turns[-1][content_key] = "word " * rng.randrange(max_length * 2, max_length * 20)
    return Bad(_json(record), LONG.format(max_length=max_length))


def malformed_files(count: int, seed: int = 0, max_length: int = 256) -> dict[str, list[Bad | None]]:
    """{format: lines}: per format a good first line (``None`` reason slot: it must be used), then about
    ``count / 5`` damaged lines, together at least ``count``."""
    rng = random.Random(seed)
    per_format = -(-count // len(GOOD))
    files: dict[str, list[Bad | None]] = {}
    for fmt in GOOD:
        specific: Callable[[random.Random, str, int], Bad] = _text_field if fmt in TEXT_FIELDS else _turns_field
        lines: list[Bad | None] = [None]
        for _ in range(per_format):
            lines.append(_common(rng, fmt) if rng.random() < 0.35 else specific(rng, fmt, max_length))
        files[fmt] = lines
    return files


def jsonl_bytes(fmt: str, lines: list[Bad | None]) -> bytes:
    """The file of :func:`malformed_files`'s lines (``None`` is the format's good record)."""
    return b"\n".join(_json(GOOD[fmt]) if bad is None else bad.line for bad in lines) + b"\n"
