"""Random inputs: token ids, and the source-side inputs the fusion topology reads."""

from __future__ import annotations

import torch

from llm_modules.model.processing import MAIN


def random_ids(batch: int, length: int, vocab: int, device: str, seed: int) -> torch.Tensor:
    """Uniform random token ids ``[batch, length]`` below ``vocab``, from a fixed seed."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=generator).to(device)


def source_inputs(batch: int, length: int, vocab: int, device: str, seed: int) -> dict[str, torch.Tensor]:
    """What the source reads: ``length`` random ids, aligned one to one with the target's tokens."""
    ids = random_ids(batch, length, vocab, device, seed)
    positions = torch.arange(length, device=device).expand(batch, -1)
    return {"source_input_ids": ids, "source_attention_mask": torch.ones_like(ids), "source_position_ids": positions,
            "source_groups": torch.full_like(ids, MAIN), "source_counts": positions + 1}
