"""Wall-clock timing that waits for the device: synchronize, and the median over repeats after a warm-up."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def synchronize(device: str) -> None:
    """Wait for the device's queued work (CUDA); nothing on CPU."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_time(run: Callable[[], object], device: str, repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``run`` in seconds, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)
