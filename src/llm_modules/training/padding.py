"""Padding token rows into one batch: the one rule behind every collator (``training/data.py``, the fact world's,
SemAlign's attribution batches, evaluation's left-padded prompts)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pad_rows(rows: Sequence[Sequence[int] | torch.Tensor], value: int, left: bool = False,
             length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer rows of lengths n_i -> (padded [B, T] long, attention mask [B, T] long: 1 on the rows' own entries).

    ``value`` fills the padding (a pad id for input ids, -100 for labels); ``left`` puts it before each row (each
    row's last entry then stands at T-1) instead of after; ``length`` T defaults to the longest row.
    """
    width = max(len(row) for row in rows) if length is None else length
    padded = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row)
        start = width - n if left else 0
        padded[i, start: start + n] = torch.as_tensor(row, dtype=torch.long)
        mask[i, start: start + n] = 1
    return padded, mask
