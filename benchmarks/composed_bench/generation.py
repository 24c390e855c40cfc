"""Timed HF ``generate``: per-step timestamps, the median of repeats, and cached decoding sampled at a few lengths."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedModel

from .plan import Plan
from .sampling import interpolated_sum, sample_lengths
from .timing import synchronize


class StepClock(LogitsProcessor):
    """Records a timestamp at every generation step (called once per forward, after the logits)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        synchronize(self.device)
        self.stamps.append(time.perf_counter())
        return scores


@dataclass
class DecodeRun:
    """One timed ``generate`` call."""

    total_s: float                       # prefill + every step
    prefill_s: float                     # call start -> first token's logits
    step_s: list[float]                  # step i (0-based) feeds token prompt+i+1: it attends prompt+i+1 positions


def timed_generate(model: PreTrainedModel, ids: torch.Tensor, new_tokens: int, device: str, **extra) -> DecodeRun:
    """Greedy HF ``generate`` of exactly ``new_tokens`` tokens, timed per step (``extra``: more generate inputs)."""
    clock = StepClock(device)
    synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, do_sample=False, logits_processor=LogitsProcessorList([clock]),
            pad_token_id=0, **extra,
        )
    synchronize(device)
    total = time.perf_counter() - start
    steps = [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]
    return DecodeRun(total, clock.stamps[0] - start, steps)


def warm_up_generate(model: PreTrainedModel, ids: torch.Tensor, device: str, **extra) -> None:
    """A short untimed generate (4 tokens): first-call costs out of the way, cheaply (a 16-token prompt
    unless ``extra`` inputs are tied to the prompt's length)."""
    timed_generate(model, ids if extra else ids[:, : min(ids.shape[1], 16)], 4, device, **extra)


def median_generate(model: PreTrainedModel, ids: torch.Tensor, new_tokens: int, plan: Plan, **extra) -> DecodeRun:
    """The run with the median total time of ``plan.repeats`` timed runs, after a warm-up."""
    warm_up_generate(model, ids, plan.device, **extra)
    runs = [timed_generate(model, ids, new_tokens, plan.device, **extra) for _ in range(plan.repeats)]
    runs.sort(key=lambda run: run.total_s)
    return runs[len(runs) // 2]


def time_cached_sampled(model: PreTrainedModel, ids: torch.Tensor, prompt: int, new_tokens: int,
                        plan: Plan) -> tuple[float, float, dict[int, float], str]:
    """A cached decode of ``new_tokens`` after ``prompt``, sampled instead of run whole.

    At each of a few lengths L: prefill ids[:, :L], then ``plan.sampled_steps`` timed decode steps (their
    median is the step time at attended length L + 1 + the middle step). The prefill at L = prompt is the
    run's prefill. Returns (total s, prefill s, {attended length: s per step}, how).
    """
    warm_up_generate(model, ids, plan.device)
    lengths = sample_lengths(prompt, prompt + new_tokens - 1, plan.cached_samples)
    points: dict[int, float] = {}
    prefill = 0.0
    for length in lengths:
        run = timed_generate(model, ids[:, :length], plan.sampled_steps + 1, plan.device)
        points[length + 1 + (plan.sampled_steps - 1) // 2] = statistics.median(run.step_s)
        if length == prompt:
            prefill = run.prefill_s
    total = prefill + interpolated_sum(points, prompt + 1, prompt + new_tokens - 1)
    how = (f"HF generate, sampled: prefill at L in {lengths} then {plan.sampled_steps} timed steps each; "
           "prefill of the prompt + piecewise-linear sum of step times")
    return total, prefill, points, how


def per_token_curve(steps: list[float], prompt: int, points: int = 5, window: int = 4) -> dict[int, float]:
    """Median step time around a few evenly spaced lengths: {attended length: seconds per token}."""
    if not steps:
        return {}
    marks = sample_lengths(0, len(steps) - 1, min(points, len(steps)))
    curve = {}
    for index in marks:
        chunk = steps[max(0, index - window): index + window + 1]
        curve[prompt + index + 1] = statistics.median(chunk)
    return curve
