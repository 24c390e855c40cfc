"""How each kind of model reads a question and gives its logits at the answer point.

A scorer turns a :class:`~.questions.Question` into model inputs (``features``), pads a batch of them on the
left (``collate``: the last column is every row's answer point) and returns the logits there
(``logits``: [B, V] over the model's vocabulary). The same scorer serves training (the letter's cross-entropy)
and scoring (the highest-logit letter), so a row is trained on exactly what it is scored on.

- ``TargetScorer``: an ordinary causal LM (target alone, SFT, LoRA-SFT, KD, SemAlign's merged target).
- ``BridgeScorer``: the paper's bridge; it reads the source's tokens and the cached source states.
- ``FusionScorer``: fusion with prompt memory; the target reads its own tokens, the blocks the cached states.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ...errors import LLMModulesError
from ...model.masks import positions_from_padding
from ...model.processing import adds_bos_token
from ...training.padding import pad_rows
from ..multiple_choice import LETTERS
from .questions import Question
from .source_pass import SourcePass, letter_token_ids, source_ids


def _left_pad_states(states: Sequence[torch.Tensor], length: int) -> torch.Tensor:
    """[B, length, ...] with each row's states [n_i, ...] in its last n_i positions, zeros before."""
    out = states[0].new_zeros((len(states), length, *states[0].shape[1:]))
    for i, row in enumerate(states):
        out[i, length - row.shape[0]:] = row
    return out


class TargetScorer:
    """An ordinary causal LM reading the question with its own tokenizer."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.letter_ids = letter_token_ids(tokenizer, len(LETTERS))
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def features(self, question: Question) -> dict:
        ids = list(self.tokenizer(question.text, add_special_tokens=False).input_ids)
        return {"input_ids": [self.tokenizer.bos_token_id, *ids] if adds_bos_token(self.tokenizer) else ids}

    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        ids, mask = pad_rows([f["input_ids"] for f in features], self.pad, left=True)
        return {"input_ids": ids, "attention_mask": mask, "position_ids": positions_from_padding(mask)}

    def logits(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**batch, logits_to_keep=1).logits[:, -1]


class BridgeScorer:
    """The bridge reads source tokens; its source states come from the source pass."""

    def __init__(self, source: SourcePass) -> None:
        self.source = source
        self.tokenizer = source.tokenizer
        self.letter_ids = letter_token_ids(self.tokenizer, len(LETTERS))
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id

    def features(self, question: Question) -> dict:
        return {"input_ids": source_ids(self.tokenizer, question.text), "states": self.source.states(question)}

    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        ids, mask = pad_rows([f["input_ids"] for f in features], self.pad, left=True)
        return {"input_ids": ids, "attention_mask": mask,
                "source_states": _left_pad_states([f["states"] for f in features], ids.shape[1])}

    def logits(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**batch, logits_to_keep=1).logits[:, -1]


class FusionScorer:
    """Fusion with prompt memory: the target reads its own tokens; the blocks read the source's cached states of
    the same text (the whole question is the prompt), aligned by ``model.processor`` (two tokenizers or one)."""

    def __init__(self, processor, source: SourcePass) -> None:
        if processor.memory != "prompt":
            raise LLMModulesError("the real table's fusion rows read the source's states of the prompt (memory='prompt')")
        self.processor = processor
        self.source = source
        self.tokenizer = processor.tokenizer
        self.letter_ids = letter_token_ids(self.tokenizer, len(LETTERS))

    def features(self, question: Question) -> dict:
        return {"text": question.text, "source_ids": source_ids(self.source.tokenizer, question.text),
                "states": self.source.states(question)}

    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        texts = [f["text"] for f in features]
        encoded = dict(self.processor(texts, source_text=texts, padding_side="left"))
        source_mask = encoded["source_attention_mask"]
        for row, (feature, ids, mask) in enumerate(zip(features, encoded["source_input_ids"], source_mask)):
            if ids[mask.bool()].tolist() != feature["source_ids"]:
                raise LLMModulesError(f"row {row}: the processor's source tokens differ from the source pass's; "
                                      "the cached states would not be the ones this model reads")
        states = _left_pad_states([f["states"] for f in features], source_mask.shape[1])
        encoded["source_states"] = states[:, :, None]  # [B, S, L=1, d_s]: the last layer, which the blocks read
        return encoded

    def logits(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**batch, logits_to_keep=1).logits[:, -1]


@torch.no_grad()
def score(model, scorer, questions: Sequence[Question], batch_size: int = 8, progress=None) -> dict:
    """{accuracy, correct, n, predictions, ids}: each question's answer is its highest-logit letter."""
    model.eval()
    device = next(p for p in model.parameters()).device
    predictions: list[int] = []
    for start in range(0, len(questions), batch_size):
        chunk = list(questions[start: start + batch_size])
        batch = {k: v.to(device) for k, v in scorer.collate([scorer.features(q) for q in chunk]).items()}
        logits = scorer.logits(model, batch).float().cpu()
        for question, row in zip(chunk, logits):
            predictions.append(int(row[scorer.letter_ids[: len(question.choices)]].argmax()))
        if progress is not None:
            progress(len(chunk))
    correct = sum(int(p == q.answer) for p, q in zip(predictions, questions))
    return {"accuracy": correct / max(1, len(questions)), "correct": correct, "n": len(questions),
            "predictions": predictions, "ids": [q.id for q in questions]}
