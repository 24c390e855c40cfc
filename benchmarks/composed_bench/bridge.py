"""The bridge topology's run: cached decoding against the release loop, the source alone and the target alone;
training with and without the source-state cache; the bandwidth bound."""

from __future__ import annotations

import gc
import statistics
from dataclasses import dataclass

from transformers import PreTrainedModel

from llm_modules.model.modeling import LLMModulesForCausalLM

from .bound import BoundRow, bench_bound, copy_bandwidth, decode_weight_bytes
from .generation import median_generate, per_token_curve, time_cached_sampled
from .inputs import random_ids
from .load import CpuUsage
from .models import compose, random_causal_lm, source_config, target_config
from .plan import Plan
from .record import RunRecord
from .progress import log, stage
from .release_loop import time_release_loop
from .report import fmt
from .rows import DecodeRow, TrainRow, make_row, ratio
from .training import bench_train
from .weights import embedding_tables, weight_count


HEADLINE_KEYS = (
    "decode_speedup_vs_recompute_256",
    "decode_speedup_vs_source_generate",
    "train_speedup_with_cache",
    "train_peak_memory_vs_target_only",
    "decode_fraction_of_bandwidth_bound",
)
DECODE_METHODS = ("ours_cached", "release_recompute", "source_generate", "target_generate")


@dataclass(frozen=True)
class DecodeWeights:
    """Matmul weights (parameter counts) each method multiplies per position it processes."""

    ours: int          # source body + connector + target body + head (embedding tables left out)
    ours_head: int     # the head alone (the release loop runs it on the last position only)
    source: int        # source body + its own output head
    target: int        # target body + its (tied) output head


def decode_weights(composed: LLMModulesForCausalLM, target_lm: PreTrainedModel) -> DecodeWeights:
    """The matmul weights of each decode method, from the built models."""
    source = composed.source
    head = composed.get_output_embeddings()
    tables = embedding_tables(source, composed.target, target_lm)
    ours = weight_count([source.base_model, composed.connector, composed.target, head], skip=tables)
    source_head = source.get_output_embeddings().weight.numel()
    target_head = target_lm.get_output_embeddings().weight.numel()
    return DecodeWeights(ours, head.weight.numel(), weight_count([source.base_model], skip=tables) + source_head,
                         weight_count([target_lm.base_model], skip=tables) + target_head)


def bench_decode(plan: Plan, composed: LLMModulesForCausalLM, target_lm: PreTrainedModel) -> list[DecodeRow]:
    """Every decode method on every case of the plan: ours, the release loop, the source and the target alone."""
    rows: list[DecodeRow] = []
    weights = decode_weights(composed, target_lm)
    source_vocab = int(composed.source.config.vocab_size)
    target_vocab = int(target_lm.config.vocab_size)
    prompt = plan.prompt
    for batch, new in plan.decode_cases:
        sampled = (batch, new) in plan.cached_sampled_cases
        ids = random_ids(batch, prompt + new, source_vocab, plan.device, seed=batch)
        target_ids = random_ids(batch, prompt, target_vocab, plan.device, seed=batch)
        cached_positions = batch * (prompt + new - 1)
        for method, model in (("ours_cached", composed), ("source_generate", composed.source)):
            log(f"decode batch {batch}, prompt {prompt}, {new} new tokens: {method}"
                f"{' (sampled)' if sampled else ''}")
            params = weights.ours if method == "ours_cached" else weights.source
            usage = CpuUsage()
            if sampled:
                total, prefill, points, how = time_cached_sampled(model, ids, prompt, new, plan)
                row = make_row(method, batch, prompt, new, total, prefill, points, statistics.median(points.values()),
                               how, 2.0 * params * cached_positions, plan, usage)
            else:
                run = median_generate(model, ids[:, :prompt], new, plan)
                row = make_row(method, batch, prompt, new, run.total_s, run.prefill_s,
                               per_token_curve(run.step_s, prompt), statistics.median(run.step_s) if run.step_s else None,
                               f"HF generate, whole run, median of {plan.repeats}", 2.0 * params * cached_positions,
                               plan, usage)
            rows.append(row)
            log(f"  {row.tokens_per_s:.3f} tok/s, {fmt(row.decode_step_s)} s/step, {row.cpu}")
            if method == "ours_cached":
                log(f"decode batch {batch}, prompt {prompt}, {new} new tokens: release_recompute")
                usage = CpuUsage()
                total, points, how = time_release_loop(composed, ids, prompt, new, plan)
                processed = batch * sum(range(prompt, prompt + new))
                flops = 2.0 * ((weights.ours - weights.ours_head) * processed + weights.ours_head * batch * new)
                rows.append(make_row("release_recompute", batch, prompt, new, total, None, points,
                                     statistics.median(points.values()), how, flops, plan, usage))
                log(f"  {rows[-1].tokens_per_s:.4f} tok/s, {rows[-1].cpu}")
        log(f"decode batch {batch}, prompt {prompt}, {new} new tokens: target_generate")
        usage = CpuUsage()
        run = median_generate(target_lm, target_ids, new, plan)
        rows.append(make_row("target_generate", batch, prompt, new, run.total_s, run.prefill_s,
                             per_token_curve(run.step_s, prompt), statistics.median(run.step_s) if run.step_s else None,
                             f"HF generate, whole run, median of {plan.repeats}", 2.0 * weights.target * cached_positions,
                             plan, usage))
        log(f"  {rows[-1].tokens_per_s:.2f} tok/s")
    attach_decode_baselines(rows)
    return rows


def attach_decode_baselines(rows: list[DecodeRow]) -> None:
    """Each row's speed-up over the release loop at the same batch and lengths."""
    release = {(r.batch, r.new_tokens): r for r in rows if r.method == "release_recompute"}
    for row in rows:
        base = release.get((row.batch, row.new_tokens))
        if base is not None:
            row.speedup_vs_baseline = ratio(row.tokens_per_s, base.tokens_per_s)


def headline(decode: list[DecodeRow], train: list[TrainRow], bounds: list[BoundRow]) -> dict:
    """The issue's headline ratios, plus the per-token growth that says whether decode time stays flat."""
    def pick(method: str, longest: bool = False) -> DecodeRow | None:
        rows = [r for r in decode if r.method == method and r.batch == 1]
        if not rows:
            return None
        return (max if longest else min)(rows, key=lambda r: r.new_tokens)

    ours, source = pick("ours_cached"), pick("source_generate")
    ours_long, release_long = pick("ours_cached", longest=True), pick("release_recompute", longest=True)
    by_name = {row.config: row for row in train}
    with_cache = by_name.get("with_cache")
    return {
        "decode_speedup_vs_recompute_256": ours.speedup_vs_baseline if ours else None,
        "decode_speedup_vs_source_generate": ratio(ours.tokens_per_s, source.tokens_per_s) if ours and source else None,
        "train_speedup_with_cache": with_cache.speedup_vs_without_cache if with_cache else None,
        "train_peak_memory_vs_target_only": with_cache.memory_vs_target_only if with_cache else None,
        "decode_fraction_of_bandwidth_bound": next((b.fraction_of_bound for b in bounds if b.batch == 1), None),
        "decode_speedup_vs_recompute_longest": ours_long.speedup_vs_baseline if ours_long else None,
        "decode_per_token_growth_ours": ours_long.per_token_growth if ours_long else None,
        "decode_per_token_growth_release": release_long.per_token_growth if release_long else None,
    }


def run(plan: Plan, skip: set[str]) -> dict:
    """The bridge run: decode and the bound, then training (``skip``: "decode", "train"); its JSON result."""
    record = RunRecord(plan)
    load = record.load
    decode: list[DecodeRow] = []
    bounds: list[BoundRow] = []
    bandwidth = None
    if "decode" not in skip:
        with stage("build source + composed + target-only models", load):
            source = random_causal_lm(source_config(plan.shapes), plan.torch_dtype, plan.device)
            composed = compose(plan.shapes, source, plan.device).to(plan.torch_dtype).eval()
            target_lm = random_causal_lm(target_config(plan.shapes), plan.torch_dtype, plan.device)
        with stage("copy bandwidth", load):
            bandwidth = copy_bandwidth(plan.device, plan.bandwidth_bytes)
        with stage("decode", load):
            decode = bench_decode(plan, composed, target_lm)
        bounds = bench_bound(decode, decode_weight_bytes(composed), bandwidth)
        del source, composed, target_lm
        gc.collect()
    train: list[TrainRow] = []
    if "train" not in skip:
        with stage("training", load):
            train = bench_train(plan)
    return record.result(headline(decode, train, bounds), decode, train, bounds, bandwidth)
