"""The released code's decoding, written here as the baseline: a full forward over the whole prefix per new token."""

from __future__ import annotations

import time

import torch

from llm_modules.model.modeling import LLMModulesForCausalLM

from .plan import Plan
from .sampling import interpolated_sum, sample_lengths
from .timing import median_time, synchronize


def recompute_step(model: LLMModulesForCausalLM, prefix: torch.Tensor) -> torch.Tensor:
    """One step of the release-style loop: a full forward over the whole prefix, no cache, argmax of the last position.

    ``logits_to_keep=1`` spares the head on earlier positions (the release computes them all): this
    favours the baseline.
    """
    logits = model(input_ids=prefix, use_cache=False, logits_to_keep=1).logits
    return logits[:, -1].argmax(-1, keepdim=True)


def release_loop(model: LLMModulesForCausalLM, ids: torch.Tensor, new_tokens: int, device: str) -> dict[int, float]:
    """The release's decoding, timed per step: every new token re-runs source, connector and target on the
    whole prefix. Returns {prefix length: seconds of that step}."""
    times: dict[int, float] = {}
    with torch.inference_mode():
        for _ in range(new_tokens):
            synchronize(device)
            start = time.perf_counter()
            next_token = recompute_step(model, ids)
            synchronize(device)
            times[ids.shape[1]] = time.perf_counter() - start
            ids = torch.cat([ids, next_token], dim=1)
    return times


def time_release_loop(model: LLMModulesForCausalLM, ids: torch.Tensor, prompt: int, new_tokens: int,
                      plan: Plan) -> tuple[float, dict[int, float], str]:
    """Total time of the release loop for ``new_tokens`` after ``prompt``, its step time per prefix length, and how.

    ``plan.recompute_samples == 0``: the whole loop runs (median total over repeats). Otherwise single
    steps run on prefixes of ``ids`` (random tokens) at a few lengths, and the total is their
    piecewise-linear sum over every step.
    """
    with torch.inference_mode():
        recompute_step(model, ids[:, : min(prompt, 16)])  # warm-up, cheap
    if plan.recompute_samples == 0:
        runs = sorted((release_loop(model, ids[:, :prompt], new_tokens, plan.device) for _ in range(plan.repeats)),
                      key=lambda times: sum(times.values()))
        points = runs[len(runs) // 2]
        return sum(points.values()), points, f"full forward + argmax per token, whole loop, median of {plan.repeats}"
    lengths = sample_lengths(prompt, prompt + new_tokens - 1, plan.recompute_samples)
    with torch.inference_mode():
        points = {n: median_time(lambda n=n: recompute_step(model, ids[:, :n]), plan.device, plan.repeats, warmup=0)
                  for n in lengths}
    how = (f"full forward + argmax per token; one step timed at prefix lengths {lengths}, "
           "piecewise-linear sum over every step")
    return interpolated_sum(points, prompt, prompt + new_tokens - 1), points, how
