"""The bandwidth bound of cached decoding: weight bytes read per step over the measured copy bandwidth."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llm_modules.model.modeling import LLMModulesForCausalLM

from .rows import DecodeRow
from .timing import median_time
from .weights import embedding_tables, weight_bytes


def copy_bandwidth(device: str, nbytes: int, repeats: int = 5) -> float:
    """Memory bandwidth in bytes/s from a large tensor copy (bytes read + bytes written per copy)."""
    source = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    destination = torch.empty_like(source)
    seconds = median_time(lambda: destination.copy_(source), device, repeats)
    return 2 * source.numel() * 4 / seconds


def decode_weight_bytes(composed: LLMModulesForCausalLM) -> int:
    """Weight bytes one cached decode step reads: source body, connector, target body and head, without the
    embedding tables (one row per token each; the composed model never runs the source's own head)."""
    tables = embedding_tables(composed.source.base_model, composed.target)
    parts = [composed.source.base_model, composed.connector, composed.target, composed.get_output_embeddings()]
    return weight_bytes(parts, skip=tables)


@dataclass
class BoundRow:
    """One batch size: the weight-read bound of a cached decode step against the measured step."""

    batch: int
    weight_bytes_per_step: int
    bandwidth_bytes_per_s: float
    bound_tokens_per_s: float
    measured_tokens_per_s: float
    fraction_of_bound: float


def bench_bound(rows: list[DecodeRow], weights: int, bandwidth: float) -> list[BoundRow]:
    """One row per batch: the shortest case of ours; its median decode step against the weight-read bound."""
    bounds = []
    for batch in sorted({r.batch for r in rows}):
        ours = [r for r in rows if r.method == "ours_cached" and r.batch == batch and r.decode_step_s]
        if not ours:
            continue
        row = min(ours, key=lambda r: r.new_tokens)
        bound = row.batch * bandwidth / weights
        measured = row.batch / row.decode_step_s
        bounds.append(BoundRow(row.batch, weights, bandwidth, bound, measured, measured / bound))
    return bounds
