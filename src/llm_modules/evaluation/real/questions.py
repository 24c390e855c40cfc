"""The real table's questions, fixed and recorded by id, and the letter format every model reads.

Transfer: ARC-Easy + ARC-Challenge train, shuffled with a fixed seed. Held out: ARC-Challenge test in file
order and MMLU test in a fixed seeded order (so that 200 questions span its subjects); neither is ever trained
on. Every model reads the same plain text (no chat template), so that one pass of the source serves every
pair and the source reads the same text whichever target it is composed with:

    {question}

    A. {choice}
    B. {choice}
    ...

    Answer with the letter of the correct choice only.
    Answer:

and its answer is the highest-logit letter token among `` A``, `` B``, ... (a space, then the letter).
This is lm-evaluation-harness's multiple-choice scoring of our ``llm_modules_*`` letter tasks, for which
``letter_prompt`` + the default target delimiter give the same text.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from ...errors import LLMModulesError
from ..multiple_choice import LETTERS, letter_text, read_rows

HELDOUT_TASKS = ("arc_challenge", "mmlu")
HOW_TO_MAKE = "python ../shared/tools/offline-datasets.py --tasks arc_easy arc_challenge mmlu"


@dataclass(frozen=True)
class Question:
    """One multiple-choice question: ``answer`` is the index of the right choice."""

    id: str
    task: str
    question: str
    choices: tuple[str, ...]
    answer: int

    @property
    def text(self) -> str:
        """What every model reads; the answer is the next token (`` A``, `` B``, ...)."""
        return letter_text({"question": self.question, "choices": self.choices})

    @property
    def letters(self) -> str:
        return LETTERS[: len(self.choices)]


def answer_tokens(count: int) -> list[str]:
    """The continuations the letter format scores: " A", " B", ..."""
    return [f" {letter}" for letter in LETTERS[:count]]


def _read(datasets: Path, task: str, split: str) -> list[Question]:
    path = datasets / task / f"{split}.jsonl"
    if not path.is_file():
        raise LLMModulesError(f"{path} does not exist; write the datasets with `{HOW_TO_MAKE} --out {datasets}`")
    rows = read_rows(path)
    questions = []
    for number, row in enumerate(rows, start=1):
        if not isinstance(row.get("id"), str):
            raise LLMModulesError(f"{path}:{number}: field 'id' must be a string (the table records questions by id)")
        questions.append(Question(row["id"], task, row["question"], tuple(row["choices"]), row["answer"]))
    return questions


@dataclass(frozen=True)
class QuestionSets:
    transfer: list[Question]
    heldout: dict[str, list[Question]]  # task -> questions

    def all(self) -> list[Question]:
        return self.transfer + [q for task in HELDOUT_TASKS for q in self.heldout.get(task, [])]

    def ids(self) -> dict[str, list[str]]:
        return {"transfer": [q.id for q in self.transfer], **{t: [q.id for q in qs] for t, qs in self.heldout.items()}}


def question_sets(datasets: str | Path, transfer: int, arc_challenge: int, mmlu: int, seed: int = 0) -> QuestionSets:
    """The table's questions. ``seed`` fixes the transfer shuffle and MMLU's order (ARC-Challenge: file order)."""
    datasets = Path(datasets).expanduser()
    pool = _read(datasets, "arc_easy", "train") + _read(datasets, "arc_challenge", "train")
    random.Random(seed).shuffle(pool)
    if transfer > len(pool):
        raise LLMModulesError(f"transfer: {transfer} questions asked, ARC-Easy + ARC-Challenge train hold {len(pool)}")
    arc = _read(datasets, "arc_challenge", "test")
    mmlu_rows = _read(datasets, "mmlu", "test")
    random.Random(seed).shuffle(mmlu_rows)
    for name, wanted, have in (("arc_challenge", arc_challenge, len(arc)), ("mmlu", mmlu, len(mmlu_rows))):
        if wanted > have:
            raise LLMModulesError(f"{name}: {wanted} held-out questions asked, its test split holds {have}")
    return QuestionSets(pool[:transfer], {"arc_challenge": arc[:arc_challenge], "mmlu": mmlu_rows[:mmlu]})
