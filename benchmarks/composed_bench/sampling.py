"""Sampled lengths: a few evenly spaced lengths, and the piecewise-linear sum of a cost known at them."""

from __future__ import annotations


def sample_lengths(first: int, last: int, samples: int) -> list[int]:
    """About ``samples`` evenly spaced lengths from ``first`` to ``last`` (all of them when 0)."""
    if samples <= 0 or samples >= last - first + 1:
        return list(range(first, last + 1))
    if samples == 1:
        return [first]
    return sorted({round(first + i * (last - first) / (samples - 1)) for i in range(samples)})


def interpolated_sum(points: dict[int, float], first: int, last: int) -> float:
    """Sum over every length in [first, last] of a per-length time known at ``points``: piecewise linear
    between known lengths, the nearest known value outside them."""
    known = sorted(points)
    total = 0.0
    for length in range(first, last + 1):
        if length <= known[0]:
            total += points[known[0]]
            continue
        if length >= known[-1]:
            total += points[known[-1]]
            continue
        right = next(k for k in known if k >= length)
        left = max(k for k in known if k <= length)
        weight = 0.0 if right == left else (length - left) / (right - left)
        total += (1 - weight) * points[left] + weight * points[right]
    return total
