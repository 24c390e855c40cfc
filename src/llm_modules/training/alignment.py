"""Training data for the fusion topology: what the source reads for each tokenized row, and a collator.

Rows come from ``data.py`` tokenized with the *target's* tokenizer (fusion keeps it). For each row the
composed model's processor decodes the target ids and aligns the source's tokens to them
(``model/processing.py``). With ``memory="prompt"`` the source reads the prompt: the text before the first
trained token (so the loss must be on assistant turns; with ``loss_on: all`` there is no prompt).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from datasets import Dataset

from ..errors import LLMModulesError
from ..model.processing import MAIN, CompositionProcessor
from .data import IGNORE_INDEX, PaddingCollator

SOURCE_COLUMNS = ("source_input_ids", "source_position_ids", "source_groups", "source_counts")


def prompt_length(labels: list[int]) -> int:
    """Tokens before the first trained one (labels are -100 on the prompt)."""
    for index, label in enumerate(labels):
        if label != IGNORE_INDEX:
            return index
    return len(labels)


def align_row(processor: CompositionProcessor, input_ids: list[int], labels: list[int]) -> dict[str, list[int]]:
    """The source_* columns of one row (lists, unpadded)."""
    text = processor.decode(input_ids)
    ends = processor.target_ends(text, input_ids)
    source_text = None
    if processor.memory == "prompt":
        prompt = prompt_length(labels)
        if prompt == 0:
            raise LLMModulesError("memory='prompt' needs a prompt before the trained tokens; with loss_on: all (or "
                                  "plain text rows) every token trains: use memory: sequence or loss_on: assistant")
        source_text = text[: ends[prompt - 1]]
    row = processor.align_row(text, input_ids, ends, source_text)
    return {"source_input_ids": row.source_ids, "source_position_ids": row.source_positions,
            "source_groups": row.source_groups, "source_counts": row.source_counts}


def add_source_alignment(dataset: Dataset, processor: CompositionProcessor) -> Dataset:
    """``dataset`` with the source_* columns added (``Dataset.map``, so it is fingerprinted and cached by datasets)."""
    return dataset.map(lambda row: align_row(processor, row["input_ids"], row["labels"]),
                       desc="aligning the source's tokens", load_from_cache_file=False)


@dataclass
class CompositionCollator(PaddingCollator):
    """``PaddingCollator`` plus the source side, right-padded to the longest source row:
    source_input_ids / source_attention_mask / source_position_ids / source_groups [B, S], source_counts [B, T],
    and cached ``source_states`` [B, S, L, d_s] when the rows carry them."""

    source_pad_token_id: int = 0

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        cached = [f.pop("source_states", None) for f in features]
        batch = super().__call__(features)
        if "source_counts" not in features[0]:
            return batch
        length = batch["input_ids"].shape[1]
        source_length = max(1, max(len(f["source_groups"]) for f in features))
        size = len(features)
        ids = torch.full((size, source_length), self.source_pad_token_id, dtype=torch.long)
        mask = torch.zeros((size, source_length), dtype=torch.long)
        positions = torch.zeros((size, source_length), dtype=torch.long)
        groups = torch.full((size, source_length), MAIN, dtype=torch.long)
        counts = torch.zeros((size, length), dtype=torch.long)
        states = None
        for row, feature in enumerate(features):
            n = len(feature["source_groups"])
            if "source_input_ids" in feature:
                ids[row, :n] = torch.as_tensor(feature["source_input_ids"])
            mask[row, :n] = 1
            positions[row, :n] = torch.as_tensor(feature["source_position_ids"])
            groups[row, :n] = torch.as_tensor(feature["source_groups"])
            counts[row, : len(feature["source_counts"])] = torch.as_tensor(feature["source_counts"])
            if cached[row] is not None:
                tensor = torch.as_tensor(cached[row])
                if tensor.shape[0] != n:
                    raise LLMModulesError(f"cached source states cover {tensor.shape[0]} source tokens, the row has {n}; "
                                          "rebuild the source-state cache")
                if states is None:
                    states = torch.zeros((size, source_length, *tensor.shape[1:]), dtype=tensor.dtype)
                states[row, :n] = tensor
        batch.update(source_attention_mask=mask, source_position_ids=positions, source_groups=groups,
                     source_counts=counts)
        if states is not None:
            batch["source_states"] = states
        else:
            batch["source_input_ids"] = ids
        return batch
