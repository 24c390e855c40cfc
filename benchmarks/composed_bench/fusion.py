"""``llm-modules bench --topology fusion``: the fusion topology against the source alone and the target alone.

Same shapes, timers and memory measures as the bridge run (:mod:`.bridge`) (Qwen2-1.5B-shaped source, GPT-Neo-125M-shaped
target, random weights, nothing from a hub):

  decode  batch 1, prompt + new tokens, greedy HF ``generate``: fusion with prompt memory (the source
          encodes the prompt once, then every step is the target plus cross-attention to cached keys and
          values), the source alone and the target alone. The fusion row includes the source's prefill.
  train   AdamW steps in fresh subprocesses: the target fine-tuned alone (every weight trains), fusion
          without the cache (the source reads the whole sequence every step: memory="sequence", its most
          expensive setting) and fusion from the source-state cache (the source is never loaded). In both
          fusion rows the target is frozen and only the gated blocks train (train_target="none").

The source and target keep their own vocabularies; the inputs are random ids given to each model
directly (the two-tokenizer alignment is a data-preparation cost, measured nowhere here).
"""

from __future__ import annotations

import gc
import statistics

from torch import nn

from llm_modules.model.modeling import LLMModulesForCausalLM

from .generation import median_generate, per_token_curve
from .inputs import random_ids, source_inputs
from .load import CpuUsage
from .models import compose_fusion, random_causal_lm, source_config, target_config
from .plan import Plan
from .record import RunRecord
from .progress import log, stage
from .rows import DecodeRow, TrainRow, make_row, ratio
from .train_configs import FUSION_TRAIN_CONFIGS
from .training import bench_train
from .weights import embedding_tables, weight_count


FUSION_HEADLINE_KEYS = (
    "fusion_decode_speedup_vs_source_generate",
    "fusion_decode_vs_target_alone",
    "fusion_train_speedup_with_cache",
    "fusion_train_peak_memory_vs_target_only",
)


def bench_fusion_decode(plan: Plan, fusion: LLMModulesForCausalLM, source: nn.Module, target: nn.Module,
                        cases: list[tuple[int, int]]) -> list[DecodeRow]:
    """Fusion with prompt memory, the source alone and the target alone on each (batch, new tokens) case."""
    rows: list[DecodeRow] = []
    tables = embedding_tables(source, target)
    source_params = weight_count([source], skip=tables)
    target_params = weight_count([target], skip=tables)
    fusion_params = target_params + weight_count([fusion.fusion])
    prompt = plan.prompt
    for batch, new in cases:
        target_ids = random_ids(batch, prompt, int(target.config.vocab_size), plan.device, seed=batch)
        extra = source_inputs(batch, prompt, int(source.config.vocab_size), plan.device, seed=batch + 1)
        source_ids = extra["source_input_ids"]
        positions = batch * (prompt + new - 1)
        for method, model, ids, inputs, flops in (
            ("fusion_prompt_cached", fusion, target_ids, extra,
             2.0 * (source_params * batch * prompt + fusion_params * positions)),
            ("source_generate", source, source_ids, {}, 2.0 * source_params * positions),
            ("target_generate", target, target_ids, {}, 2.0 * target_params * positions),
        ):
            log(f"decode batch {batch}, prompt {prompt}, {new} new tokens: {method}")
            usage = CpuUsage()
            run = median_generate(model, ids, new, plan, **inputs)
            rows.append(make_row(method, batch, prompt, new, run.total_s, run.prefill_s,
                                 per_token_curve(run.step_s, prompt),
                                 statistics.median(run.step_s) if run.step_s else None,
                                 f"HF generate, whole run, median of {plan.repeats}", flops, plan, usage))
            rows[-1].baseline = "source_generate"
            log(f"  {rows[-1].tokens_per_s:.3f} tok/s, prefill {rows[-1].prefill_s:.3f} s, "
                f"{rows[-1].decode_step_s} s/step, {rows[-1].cpu}")
    by_case = {(r.batch, r.new_tokens): r for r in rows if r.method == "source_generate"}
    for row in rows:
        row.speedup_vs_baseline = ratio(row.tokens_per_s, by_case[(row.batch, row.new_tokens)].tokens_per_s)
    return rows


def fusion_headline(decode: list[DecodeRow], train: list[TrainRow]) -> dict:
    """Decode ratios per token after the prompt (what decoding costs: the source has read the prompt), and
    end to end (the source's encoding of the prompt included: a fixed cost per request)."""
    def pick(method: str) -> DecodeRow | None:
        rows = [r for r in decode if r.method == method and r.batch == 1]
        return min(rows, key=lambda r: r.new_tokens) if rows else None

    def per_step(fast: DecodeRow | None, slow: DecodeRow | None) -> float | None:
        ok = fast and slow and fast.decode_step_s and slow.decode_step_s
        return ratio(slow.decode_step_s, fast.decode_step_s) if ok else None

    def end_to_end(fast: DecodeRow | None, slow: DecodeRow | None) -> float | None:
        return ratio(fast.tokens_per_s, slow.tokens_per_s) if fast and slow else None

    fusion, source, target = pick("fusion_prompt_cached"), pick("source_generate"), pick("target_generate")
    by_name = {row.config: row for row in train}
    cached, uncached, alone = (by_name.get(n) for n in ("fusion_with_cache", "fusion_without_cache", "target_only"))
    return {
        "fusion_decode_speedup_vs_source_generate": per_step(fusion, source),
        "fusion_decode_vs_target_alone": per_step(fusion, target),
        "fusion_train_speedup_with_cache": ratio(uncached.step_s, cached.step_s) if cached and uncached else None,
        "fusion_train_peak_memory_vs_target_only": ratio(cached.peak_memory_bytes, alone.peak_memory_bytes)
        if cached and alone else None,
        "fusion_end_to_end_speedup_vs_source_generate": end_to_end(fusion, source),
        "fusion_end_to_end_vs_target_alone": end_to_end(fusion, target),
        "fusion_prefill_s": fusion.prefill_s if fusion else None,
        "target_prefill_s": target.prefill_s if target else None,
    }


def run_fusion(plan: Plan, skip: set[str]) -> dict:
    """The fusion run: decode, then training (``skip``: "decode", "train"); its JSON result."""
    record = RunRecord(plan)
    load = record.load
    cases = [(1, plan.prompt)] if plan.shapes == "paper" else [(1, 16)]
    decode: list[DecodeRow] = []
    if "decode" not in skip:
        with stage("build source, target and fusion models", load):
            source = random_causal_lm(source_config(plan.shapes), plan.torch_dtype, plan.device)
            target = random_causal_lm(target_config(plan.shapes), plan.torch_dtype, plan.device)
            fusion = compose_fusion(plan, source, target, "prompt").to(plan.device, plan.torch_dtype).eval()
        with stage("decode", load):
            decode = bench_fusion_decode(plan, fusion, source, target, cases)
        del source, target, fusion
        gc.collect()
    train: list[TrainRow] = []
    if "train" not in skip:
        with stage("training", load):
            train = bench_train(plan, FUSION_TRAIN_CONFIGS)
    return record.result(fusion_headline(decode, train), decode, train, [], None, topology="fusion")
