"""Planning a SemAlign run before it trains: the semantic map M and the layer pairs (with their report).

Shared by ``llm-modules train --method semalign`` (real models, ``train.py``) and the fact-world
comparison (``factworld.py``): both give token rows and get back an :class:`AlignmentPlan`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ...errors import LLMModulesError
from ...model.loss import IGNORE_INDEX, causal_lm_loss
from ..atomic import atomic_write_json
from ..padding import pad_rows
from .bases import TokenAlignment, align_vocabularies, cached_semantic_map, output_head
from .layers import LayerPair, choose_pairs, gradient_x_activation, plot_pairs
from .models import tap_names
from .objective import NEEDS_SOURCE_LOGITS
from .options import SemAlignOptions


@dataclass
class AlignmentPlan:
    """What a SemAlign run aligns: M [D_tgt, D_src], the pairs, the source taps and the attribution."""

    semantic_map: torch.Tensor
    map_fingerprint: str
    map_from_disk: bool
    aligned_tokens: int
    scores: list[float]
    pairs: list[LayerPair]
    taps: list[str]
    source_layers: int
    target_layers: int
    source_head: torch.Tensor | None = field(default=None, repr=False)

    def report(self) -> dict:
        return {
            "pairs": [p.to_dict() for p in self.pairs],
            "attribution": {str(i + 1): s for i, s in enumerate(self.scores)},
            "critical_layers": [p.critical for p in self.pairs],
            "source_layers": self.source_layers,
            "target_layers": self.target_layers,
            "taps": self.taps,
            "semantic_map": {"fingerprint": self.map_fingerprint, "from_disk": self.map_from_disk,
                             "shape": list(self.semantic_map.shape), "aligned_tokens": self.aligned_tokens},
        }

    def write(self, folder: str | Path) -> None:
        """``semalign_plan.json`` and ``semalign_pairs.png`` (attribution per source layer, the pairs)."""
        folder = Path(folder)
        atomic_write_json(folder / "semalign_plan.json", self.report())
        plot_pairs(self.scores, self.pairs, self.target_layers, folder / "semalign_pairs.png")


def map_folder(options: SemAlignOptions) -> Path | None:
    if options.map_cache in (None, "", "none", "off"):
        return None
    if options.map_cache == "auto":
        root = os.environ.get("LLM_MODULES_CACHE", Path.home() / ".cache" / "llm-modules")
        return Path(root) / "semantic-maps"
    return Path(options.map_cache).expanduser()


def row_batches(rows: Sequence[dict], batch_size: int, pad_id: int, device: str | torch.device = "cpu"):
    """Right-padded batches (input_ids/attention_mask/labels [B, T]) of token rows {input_ids, labels}."""
    for start in range(0, len(rows), batch_size):
        chunk = rows[start: start + batch_size]
        ids, mask = pad_rows([r["input_ids"] for r in chunk], pad_id)
        labels, _ = pad_rows([r["labels"] for r in chunk], IGNORE_INDEX)
        yield {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def check_rows_aligned(rows: Sequence[dict], alignment: TokenAlignment) -> None:
    """With shared tokens only, both models read the same ids: every id in the data must mean the same token."""
    same = {s for s, t in zip(alignment.source_ids, alignment.target_ids) if s == t}
    for index, row in enumerate(rows):
        bad = [i for i in row["input_ids"] if i not in same]
        if bad:
            raise LLMModulesError(
                f"row {row.get('row', index)}: token id {bad[0]} does not mean the same token for the source and the "
                "target; shared_tokens_only needs data whose ids both tokenizers share (same text, same id)")


def plan_alignment(
    source: nn.Module | None,
    source_layers: int,
    source_head: torch.Tensor,
    target_head: torch.Tensor,
    target_layers: int,
    source_tokenizer: PreTrainedTokenizerBase,
    target_tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[dict],
    options: SemAlignOptions,
    pad_id: int,
    device: str | torch.device = "cpu",
) -> AlignmentPlan:
    """Vocabulary check -> M (cached) -> Gradient x Activation on ``rows`` -> pairs -> taps.

    ``source`` may be None when no attribution runs (``critical_layers`` given, or ``layer_loss: none``).
    """
    alignment = align_vocabularies(source_tokenizer, target_tokenizer, source_head.shape[0], target_head.shape[0],
                                   options.shared_tokens_only)
    if alignment.shared_only:
        check_rows_aligned(rows, alignment)
    matrix, fingerprint, from_disk = cached_semantic_map(source_head, target_head, alignment, map_folder(options))
    if options.critical_layers or options.layer_loss == "none":  # given, or not needed (output loss only)
        scores = [float("nan")] * source_layers
    else:
        if source is None:
            raise LLMModulesError("the attribution needs the source model")
        chosen = list(rows[: options.attribution_rows])
        print(f"semalign: Gradient x Activation over {len(chosen)} transfer rows, {source_layers} source layers",
              file=sys.stderr)
        scores = gradient_x_activation(source, row_batches(chosen, options.attribution_batch_size, pad_id, device),
                                       causal_lm_loss, options.interface, options.attribution_reduce)
    pairs = [] if options.layer_loss == "none" else choose_pairs(scores, target_layers, options.pairs,
                                                                  options.critical_layers or None)
    needs_final = options.output_loss in NEEDS_SOURCE_LOGITS
    taps = tap_names(pairs, options.interface, needs_final)
    return AlignmentPlan(matrix, fingerprint, from_disk, len(alignment.source_ids), scores, pairs, taps,
                         source_layers, target_layers, source_head if needs_final else None)


__all__ = ["AlignmentPlan", "output_head", "plan_alignment", "row_batches"]
