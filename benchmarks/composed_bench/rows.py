"""Result rows of decoding and training, and the ratios between them."""

from __future__ import annotations

from dataclasses import dataclass

from .load import CpuUsage
from .machine import gpu_peak_flops
from .plan import Plan


def ratio(value: float | None, baseline: float | None) -> float | None:
    """``value / baseline``, or None when either is missing or zero."""
    return None if not value or not baseline else value / baseline


@dataclass
class DecodeRow:
    """One decode method on one case (batch, prompt, new tokens)."""

    method: str
    batch: int
    prompt: int
    new_tokens: int
    total_s: float
    tokens_per_s: float
    prefill_s: float | None
    decode_step_s: float | None          # median per-token time after prefill
    per_token_s: dict[int, float]        # {attended length: s per decode step}
    per_token_growth: float | None       # per-token time at the longest length / at the shortest (1 = flat)
    measured: str
    achieved_flops: float | None = None  # 2 x matmul weights x positions processed / total time
    mfu: float | None = None             # achieved / the GPU's dense peak (GPU only)
    cpu: dict | None = None              # cores used by us / by other processes while measured
    baseline: str = "release_recompute"
    speedup_vs_baseline: float | None = None


def growth(curve: dict[int, float]) -> float | None:
    """Per-token time at the longest length over the shortest (1.0 = flat)."""
    if len(curve) < 2:
        return None
    lengths = sorted(curve)
    return curve[lengths[-1]] / curve[lengths[0]]


def make_row(method: str, batch: int, prompt: int, new: int, total: float, prefill: float | None,
             curve: dict[int, float], step: float | None, measured: str, flops: float, plan: Plan,
             usage: CpuUsage) -> DecodeRow:
    """A decode row from its timings; tokens/s, growth, achieved FLOP/s and MFU derived."""
    achieved = flops / total
    peak = gpu_peak_flops(plan)
    return DecodeRow(method, batch, prompt, new, total, batch * new / total, prefill, step,
                     {int(k): v for k, v in curve.items()}, growth(curve), measured, achieved,
                     achieved / peak if peak else None, usage.summary())


@dataclass
class TrainRow:
    """One training configuration's step: time, throughput, memory and FLOPs."""

    config: str
    batch: int
    seq: int
    step_s: float
    tokens_per_s: float
    peak_memory_bytes: int
    memory_after_build_bytes: int        # weights + the batch, before the first step (same measure)
    memory_measure: str
    trainable_parameters: int
    flops_per_step: float
    achieved_flops: float
    mfu: float | None
    cpu: dict | None = None
    speedup_vs_without_cache: float | None = None
    memory_vs_target_only: float | None = None
