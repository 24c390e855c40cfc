"""What a training run gives back, whichever loop ran it: the fact world's plain loop or ``Trainer``.

The plain loop (``evaluation/factworld/lm.py``) records the loss of every step, its validation scores and the step
it kept; a ``Trainer`` run (``llm-modules train``, SemAlign) records as much of that as ``Trainer`` knows, plus its
output folder, metrics, log history, step times, model and trainer. Also the parts of ``train_results.json``
that every ``Trainer`` run writes alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from transformers import Trainer


@dataclass
class TrainResult:
    """One run. ``losses``: the training loss per optimizer step (``Trainer``: per logging step); ``validation``:
    (step, score) per evaluation of the plain loop (a validation accuracy, higher is better); ``best_step``: the step
    whose weights were kept; ``steps_run``: optimizer steps taken; ``plan``: SemAlign's alignment plan."""

    losses: list[float] = field(default_factory=list)
    validation: list[tuple[int, float]] = field(default_factory=list)
    best_step: int = 0
    seconds: float = 0.0
    steps_run: int = 0
    output: Path | None = None
    metrics: dict = field(default_factory=dict)
    log_history: list[dict] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    model: nn.Module | None = field(default=None, repr=False)
    trainer: Trainer | None = field(default=None, repr=False)
    plan: Any = field(default=None, repr=False)

    @classmethod
    def of_trainer(cls, trainer: Trainer, output: Path, metrics: dict, step_times: list[float], model: nn.Module,
                   seconds: float, **extra: Any) -> TrainResult:
        """The result of a finished ``trainer.train()`` that took ``seconds``."""
        history = list(trainer.state.log_history)
        return cls(losses=[e["loss"] for e in history if "loss" in e], seconds=seconds,
                   best_step=trainer.state.best_global_step or trainer.state.global_step,
                   steps_run=trainer.state.global_step, output=output, metrics=metrics, log_history=history,
                   step_times=step_times, model=model, trainer=trainer, **extra)


def trainer_summary(trainer: Trainer, step_times: list[float], nonfinite_policy: str) -> dict:
    """``train_results.json``'s ``steps``, ``step_time_s`` (the first step apart: it warms up) and ``nonfinite_loss``
    (the policy and the batches skipped; ``trainer`` carries ``NonFiniteLossGuard``)."""
    steady = step_times[1:] or step_times
    return {
        "steps": trainer.state.global_step,
        "step_time_s": {"mean": sum(steady) / max(1, len(steady)), "first": step_times[0] if step_times else None,
                        "count": len(step_times)},
        "nonfinite_loss": {"policy": nonfinite_policy, "skipped_batches": len(trainer.nonfinite_skips),
                           "skipped": trainer.nonfinite_skips[:50]},
    }
