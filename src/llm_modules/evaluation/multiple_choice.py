"""Multiple-choice questions (ARC, SciQ, MMLU rows of ``tools/offline-datasets.py``) as chat rows and letter accuracy.

A row is ``{"question": str, "choices": [str], "answer": int}``. The prompt lists the choices as
``A. ...`` lines and asks for the letter; the assistant's reply is the letter alone. Accuracy is
read from the next-token logits right after the generation prompt: the letter with the highest
logit among the row's letters is the model's answer (no sampling, no answer parsing).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from ..errors import LLMModulesError
from ..model.masks import positions_from_padding
from ..training.padding import pad_rows

LETTERS = "ABCDEFGH"


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a multiple-choice JSONL file, checked (errors name the file, line and field)."""
    rows = []
    # split on "\n" only: str.splitlines() also splits on U+2028 and other separators inside JSON strings (MMLU has them)
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise LLMModulesError(f"{path}:{number}: not a JSON object ({error.msg} at column {error.colno})") from error
        if not isinstance(row, dict):
            raise LLMModulesError(f"{path}:{number}: expected a JSON object with question, choices and answer")
        for name, kind in (("question", str), ("choices", list), ("answer", int)):
            if not isinstance(row.get(name), kind):
                raise LLMModulesError(f"{path}:{number}: field {name!r} must be a {kind.__name__}")
        if not 2 <= len(row["choices"]) <= len(LETTERS) or not 0 <= row["answer"] < len(row["choices"]):
            raise LLMModulesError(f"{path}:{number}: expected 2-{len(LETTERS)} choices and an answer index among them")
        rows.append(row)
    return rows


def prompt_text(row: dict) -> str:
    lines = [row["question"].strip(), ""] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(row["choices"])]
    return "\n".join(lines + ["", "Answer with the letter of the correct choice only."])


def letter_text(row: dict) -> str:
    """The plain letter format (no chat template): the prompt, then ``Answer:``; the answer is `` A``, `` B``...

    What the real table (``evaluation/real``) and the lm-eval tasks ``llm_modules_arc_challenge`` /
    ``llm_modules_mmlu`` both read, so that their numbers can be compared question by question.
    """
    return prompt_text(row) + "\nAnswer:"


def chat_row(row: dict) -> dict:
    """A training row in the ``messages`` format: the question with its choices, the letter as the reply."""
    return {"messages": [{"role": "user", "content": prompt_text(row)},
                         {"role": "assistant", "content": LETTERS[row["answer"]]}]}


def letter_ids(tokenizer: PreTrainedTokenizerBase, count: int) -> list[int]:
    ids = []
    for letter in LETTERS[:count]:
        encoded = tokenizer(letter, add_special_tokens=False).input_ids
        if len(encoded) != 1:
            raise LLMModulesError(f"the letter {letter!r} is {len(encoded)} tokens for this tokenizer; expected one")
        ids.append(encoded[0])
    return ids


@torch.no_grad()
def letter_accuracy(model, tokenizer: PreTrainedTokenizerBase, rows: Sequence[dict], batch_size: int = 8) -> dict:
    """{accuracy, correct, n, predictions}: the highest-logit letter after each row's generation prompt."""
    model.eval()
    device = next(model.parameters()).device
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": prompt_text(r)}], add_generation_prompt=True,
                                             tokenize=False) for r in rows]
    predictions = []
    for start in range(0, len(rows), batch_size):
        encoded = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts[start: start + batch_size]]
        # left padding: the last position is every row's answer point
        ids, mask = pad_rows(encoded, tokenizer.pad_token_id, left=True)
        positions = positions_from_padding(mask)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device)).logits[:, -1]
        for row, scores in zip(rows[start: start + batch_size], logits.float().cpu()):
            letters = letter_ids(tokenizer, len(row["choices"]))
            predictions.append(int(scores[letters].argmax()))
    correct = sum(int(p == r["answer"]) for p, r in zip(predictions, rows))
    return {"accuracy": correct / max(1, len(rows)), "correct": correct, "n": len(rows), "predictions": predictions}
