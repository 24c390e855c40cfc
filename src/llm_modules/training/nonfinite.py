"""What a NaN or inf training loss does: stop the run with step, rows and last good checkpoint named, or skip the batch.

``Trainer`` by itself back-propagates a NaN loss into every weight and only hides it from the
logged average (``logging_nan_inf_filter``). Here the loss of each training micro-batch is
checked before the backward pass. Under DDP the check is all-reduced first, so every rank takes
the same branch (a rank that skipped its backward alone would leave the others waiting forever).

``stop`` (default) raises :class:`NonFiniteLossError`. ``skip`` back-propagates an exact zero
instead: the batch adds no gradient (the optimizer step still runs on the other micro-batches of
that step; with AdamW a step on a zero gradient still applies momentum and weight decay), and
the skip is counted with its step and rows for ``train_results.json``.
"""

from __future__ import annotations

import torch
from accelerate.utils import gather_object

from ..errors import LLMModulesError
from .checkpoints import last_good_checkpoint

POLICIES = ("stop", "skip")


class NonFiniteLossError(LLMModulesError):
    """The training loss became NaN or inf and the run was asked to stop."""


class NonFiniteLossGuard:
    """``Trainer`` mixin; set ``nonfinite_policy`` (stop | skip). Batches may carry ``rows`` (file:row names)."""

    nonfinite_policy: str = "stop"

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        rows = inputs.pop("rows", None)
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if not model.training:
            return result
        loss = result[0] if return_outputs else result
        step = self.state.global_step + 1
        micro = self._micro_batches = (getattr(self, "_micro_batches", 0) + 1
                                       if getattr(self, "_micro_step", None) == step else 1)
        self._micro_step = step
        bad = (~torch.isfinite(loss.detach())).float().reshape(1)
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, reduction="sum")
        if bad.item() == 0:
            return result
        rows = list(rows or [])
        if self.accelerator.num_processes > 1:  # every rank is here (the flag was all-reduced): name all their rows
            rows = gather_object(rows)
        where = {"step": step, "micro_batch": micro, "loss": float(loss.detach()), "rows": rows}
        if self.nonfinite_policy == "stop":
            checkpoint = last_good_checkpoint(self.args.output_dir)
            value = "NaN or inf on another rank" if torch.isfinite(loss.detach()) else str(float(loss.detach()))
            raise NonFiniteLossError(
                f"the training loss is {value} at step {step} (micro-batch {micro}, rows {', '.join(where['rows']) or '?'}); "
                f"the last good checkpoint is {checkpoint or 'none yet'}. Lower the learning rate, train in fp32 or "
                f"bf16, or check these rows, then resume{f' with --resume {checkpoint}' if checkpoint else ''}; "
                "or set on_nonfinite_loss: skip to skip such batches (counted in train_results.json)"
            )
        self.nonfinite_skips.append(where)
        # d(zero)/dp = 0 for every trainable weight: no NaN reaches a gradient, every DDP hook still fires.
        zero = sum((p.reshape(-1)[:1] * 0.0).sum() for p in model.parameters() if p.requires_grad)
        skipped = zero + loss.detach()  # its value stays NaN/inf: Trainer's logging filter leaves it out of the average
        return (skipped, result[1]) if return_outputs else skipped

    @property
    def nonfinite_skips(self) -> list[dict]:
        if not hasattr(self, "_nonfinite_skips"):
            self._nonfinite_skips = []
        return self._nonfinite_skips
