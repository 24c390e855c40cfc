"""Functions the task YAMLs of this folder call (``!function utils.NAME``); lm-eval loads this file by path.

The letter prompt is the one the project's real table reads (``multiple_choice.letter_text``): the question, a
blank line, one ``A. choice`` line per choice, a blank line, an instruction to answer with the letter only, and
``Answer:``; each choice is scored as lm-eval scores any multiple-choice task, `` A``, `` B``... after it.
"""

from __future__ import annotations

import math

LETTERS = "ABCDEFGH"
SHUFFLE_SEED = 1234
INVALID = "[invalid]"


def letter_prompt(doc: dict) -> str:
    """The question, its ``A. choice`` lines, the instruction, then ``Answer:`` (lm-eval appends " A", " B"...).

    The same text as ``llm_modules.evaluation.multiple_choice.letter_text`` (the real table's), written out here
    because lm-eval loads this file by path."""
    lines = [doc["question"].strip(), ""] + [f"{LETTERS[i]}. {choice}" for i, choice in enumerate(doc["choices"])]
    return "\n".join(lines + ["", "Answer with the letter of the correct choice only.", "Answer:"])


def letter_choices(doc: dict) -> list[str]:
    if not 2 <= len(doc["choices"]) <= len(LETTERS):
        raise ValueError(f"question {doc.get('id')!r}: expected 2-{len(LETTERS)} choices, got {len(doc['choices'])}")
    return list(LETTERS[: len(doc["choices"])])


def shuffled(dataset):
    """The rows in a fixed random order (so that the first N span the file's subjects)."""
    return dataset.shuffle(seed=SHUFFLE_SEED)


def canonical_answer(text: str | None) -> str:
    """llm-modules eval's extracted answer, normalised; numbers written by value (``72.0`` -> ``72``)."""
    from llm_modules.evaluation.evaluate import extract_answer, normalize_answer

    answer = extract_answer(text or "")
    if answer is None:
        return INVALID
    answer = normalize_answer(answer)
    try:
        value = float(answer)
    except ValueError:
        return answer
    if not math.isfinite(value):
        return answer
    return str(int(value)) if value == int(value) else repr(value)


def extract_answers(responses: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """lm-eval ``custom`` filter: every response -> its canonical answer."""
    return [[canonical_answer(r) for r in rows] for rows in responses]
