"""What one run measures (shapes, cases, repeats, sampling), chosen from the command line."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .memory import GIB


@dataclass(frozen=True)
class Plan:
    """What one run measures; chosen from ``--shapes``, ``--device``, ``--dtype`` and ``--quick``."""

    shapes: str
    device: str
    dtype: str
    quick: bool
    prompt: int
    decode_cases: tuple[tuple[int, int], ...]     # (batch, new tokens): every method is measured on each
    cached_sampled_cases: tuple[tuple[int, int], ...]  # cases where ours / source-alone are sampled, not run whole
    cached_samples: int                  # lengths at which a sampled cached decode is timed
    sampled_steps: int                   # decode steps timed after each such prefill (median)
    repeats: int
    recompute_samples: int               # prefix lengths timed for the release loop (0 = the whole loop runs)
    train_batch: int
    train_seq: int
    train_steps: int
    bandwidth_bytes: int
    threads: int | None = None
    notes: tuple[str, ...] = field(default=())

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.dtype == "bfloat16" else torch.float32

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        def pairs(value: Sequence) -> tuple[tuple[int, int], ...]:
            return tuple((int(a), int(b)) for a, b in value)

        return cls(**dict(data, decode_cases=pairs(data["decode_cases"]),
                          cached_sampled_cases=pairs(data["cached_sampled_cases"]), notes=tuple(data["notes"])))


def make_plan(shapes: str, device: str, dtype: str | None, quick: bool, threads: int | None = None) -> Plan:
    """The plan for these options: what runs whole, what is sampled, and notes saying so."""
    dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    notes: list[str] = []
    if shapes == "tiny":
        # Exercises every code path (whole runs, sampled cached decode, sampled release loop) in seconds.
        return Plan(shapes, device, dtype, quick, prompt=16, decode_cases=((1, 16), (2, 16), (1, 32)),
                    cached_sampled_cases=((1, 32),), cached_samples=3, sampled_steps=3,
                    repeats=1 if quick else 3, recompute_samples=3 if quick else 0,
                    train_batch=2, train_seq=32, train_steps=2 if quick else 3, bandwidth_bytes=64 * 2**20,
                    threads=threads)
    slow_cpu = device == "cpu"
    sampled_steps = 4
    every_case = ((1, 128), (1, 512), (8, 128), (8, 512))
    if not slow_cpu:  # a GPU: everything runs whole, 3 repeats, median
        return Plan(shapes, device, dtype, quick, prompt=128, decode_cases=every_case, cached_sampled_cases=(),
                    cached_samples=0, sampled_steps=0, repeats=1 if quick else 3, recompute_samples=0,
                    train_batch=4, train_seq=128, train_steps=5 if quick else 10, bandwidth_bytes=GIB,
                    threads=threads)
    if quick:
        cases, sampled, cached_samples, recompute_samples = ((1, 128), (1, 512), (8, 128)), ((1, 512),), 4, 3
        notes.append("--quick on CPU: cases batch 1 x 128, batch 1 x 512 and batch 8 x 128 new tokens (batch 8 x 512 "
                     "left out: ~20 more minutes on 2 cores); 1 timed repeat after a warm-up")
        notes.append("ours and the source alone run HF generate whole at batch 1 x 128 and batch 8 x 128; at batch "
                     f"1 x 512 they are sampled: a prefill of a random prompt of length L, then {sampled_steps} timed "
                     f"decode steps (median), at {cached_samples} evenly spaced L; tokens/s = batch x new / (prefill "
                     "of the prompt + piecewise-linear sum of the step times over every step)")
    else:
        cases, sampled, cached_samples, recompute_samples = every_case, (), 0, 6
    notes.append(f"release loop on CPU: one full-prefix step timed at {recompute_samples} evenly spaced prefix "
                 "lengths (random ids; the cost does not depend on values and grows linearly with the prefix), "
                 "total = piecewise-linear sum over every step; the whole loop is hours at batch 8 on CPU")
    notes.append("CPU: other processes may share the cores; every ratio compares numbers from this one run, and "
                 "each row records the cores used by this benchmark and by other processes while it was measured")
    if threads:
        notes.append(f"torch CPU threads: {threads} (--threads); with busy cores, more threads than free cores "
                     "make every parallel region wait for a descheduled thread")
    return Plan(shapes, device, dtype, quick, prompt=128, decode_cases=cases, cached_sampled_cases=sampled,
                cached_samples=cached_samples, sampled_steps=sampled_steps, repeats=1 if quick else 3,
                recompute_samples=recompute_samples, train_batch=4, train_seq=128, train_steps=2 if quick else 4,
                bandwidth_bytes=GIB, threads=threads, notes=tuple(notes))
