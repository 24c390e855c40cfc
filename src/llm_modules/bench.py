"""``llm-modules bench``: decode, training and memory benchmarks against the alternatives, in one run.

Models are built at the paper's real shapes with random weights (performance does not depend on
weight values): a Qwen2-1.5B-shaped source and a GPT-Neo-125M-shaped target, both from their
``transformers`` config classes, nothing from a hub. Every number is a median over repeats after a
warm-up, and every row carries its ratio to a baseline measured in the same run.

Measured:
  decode    tokens/s of the composed model with its caches, a release-style loop that recomputes
            the whole prefix per token, the source alone (HF ``generate``) and the target alone;
            per-token time at several lengths; achieved FLOP/s and (GPU) MFU. Where a whole run is
            too slow (CPU at paper shapes) steps are timed at a few lengths and summed piecewise-linearly;
            the plan's notes say which.
  train     step time, tokens/s, MFU (GPU) and peak memory: composed without cache, composed from the
            source-state cache (source not loaded), the target fine-tuned alone. One fresh subprocess
            each, so that CPU peak memory (process peak RSS) belongs to one configuration.
  bound     weight bytes read per decoded token / measured copy bandwidth, and the fraction reached.
  load      cores used by this benchmark and by other processes during every row and stage.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    GPTNeoConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedConfig,
    PreTrainedModel,
    Qwen2Config,
)
from transformers.initialization import no_init_weights

from .model.modeling import LLMModulesForCausalLM
from .tiny import build_tokenizer, tiny_config

HEADLINE_KEYS = (
    "decode_speedup_vs_recompute_256",
    "decode_speedup_vs_source_generate",
    "train_speedup_with_cache",
    "train_peak_memory_vs_target_only",
    "decode_fraction_of_bandwidth_bound",
)
TRAIN_CONFIGS = ("without_cache", "with_cache", "target_only")
DECODE_METHODS = ("ours_cached", "release_recompute", "source_generate", "target_generate")
# Dense bf16 / fp32 (TF32 off) peak FLOP/s of GPUs we know, for MFU; matched on the device name.
GPU_PEAK_FLOPS = {"H100": {"bfloat16": 989e12, "float32": 67e12}, "H200": {"bfloat16": 989e12, "float32": 67e12},
                  "A100": {"bfloat16": 312e12, "float32": 19.5e12}}
GIB = 2**30


# ------------------------------------------------------------------------------------------ shapes
def source_config(shapes: str) -> PreTrainedConfig:
    """Qwen2-1.5B's config (paper) or a tiny Qwen2."""
    if shapes == "tiny":
        return tiny_config("qwen2", vocab_size=1024, hidden=64, layers=2, heads=4, max_positions=2048,
                           tokenizer=build_tokenizer())
    return Qwen2Config(
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, hidden_act="silu", max_position_embeddings=131072,
        rms_norm_eps=1e-6, rope_parameters={"rope_theta": 1000000.0, "rope_type": "default"},
        use_sliding_window=False, sliding_window=None, max_window_layers=28, tie_word_embeddings=True,
        bos_token_id=151643, eos_token_id=151643,
    )


def target_config(shapes: str) -> PreTrainedConfig:
    """GPT-Neo-125M's config (paper: 12 layers alternating global/local window 256) or a tiny GPT-Neo."""
    if shapes == "tiny":
        return tiny_config("gpt_neo", vocab_size=512, hidden=64, layers=2, heads=4, max_positions=2048,
                           tokenizer=build_tokenizer())
    return GPTNeoConfig(
        vocab_size=50257, hidden_size=768, num_layers=12, num_heads=12,
        attention_types=[[["global", "local"], 6]], window_size=256, max_position_embeddings=2048,
        activation_function="gelu_new", embed_dropout=0.0, resid_dropout=0.0, attention_dropout=0.0,
        layer_norm_epsilon=1e-5, bos_token_id=50256, eos_token_id=50256, tie_word_embeddings=True,
    )


def random_causal_lm(config: PreTrainedConfig, dtype: torch.dtype, device: str, seed: int = 0) -> PreTrainedModel:
    """A causal LM from ``config`` with N(0, 0.02) weights, filled in place (HF's init is 3x slower at 1.5B)."""
    torch.manual_seed(seed)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.tie_weights()  # no_init_weights skips the tying: Qwen2-1.5B and GPT-Neo-125M share embedding and head
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.zero_()
            elif parameter.dim() == 1:  # norms
                parameter.fill_(1.0)
            else:
                parameter.normal_(0.0, 0.02)
    return model.to(device=device, dtype=dtype).eval()


def compose(shapes: str, source: PreTrainedModel | None, device: str) -> LLMModulesForCausalLM:
    """The composed model (paper defaults) on a loaded source, or without it (source-state cache)."""
    torch.manual_seed(1)
    tokenizer = build_tokenizer()
    if source is None:
        model = LLMModulesForCausalLM.compose(
            None, target_config(shapes), source_config=source_config(shapes), tokenizer=tokenizer, target_init="random"
        )
    else:
        model = LLMModulesForCausalLM.compose(source, target_config(shapes), tokenizer=tokenizer, target_init="random")
    return model.to(device)


# ---------------------------------------------------------------------------------------- the plan
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


# --------------------------------------------------------------------------------------- utilities
def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def synchronize(device: str) -> None:
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


def ratio(value: float | None, baseline: float | None) -> float | None:
    return None if not value or not baseline else value / baseline


def random_ids(batch: int, length: int, vocab: int, device: str, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=generator).to(device)


def weight_bytes(modules: Sequence[nn.Module], skip: Sequence[nn.Module] = ()) -> int:
    """Bytes of parameters in ``modules``, leaving out ``skip`` (tables read one row per token)."""
    return sum(p.numel() * p.element_size() for p in _parameters(modules, skip))


def weight_count(modules: Sequence[nn.Module], skip: Sequence[nn.Module] = ()) -> int:
    return sum(p.numel() for p in _parameters(modules, skip))


def _parameters(modules: Sequence[nn.Module], skip: Sequence[nn.Module]) -> list[nn.Parameter]:
    skipped = {id(p) for module in skip for p in module.parameters()}
    seen: set[int] = set()
    found = []
    for module in modules:
        for parameter in module.parameters():
            if id(parameter) not in seen and id(parameter) not in skipped:
                seen.add(id(parameter))
                found.append(parameter)
    return found


def embedding_tables(*modules: nn.Module) -> list[nn.Module]:
    return [m for module in modules for m in module.modules() if isinstance(m, nn.Embedding)]


# ------------------------------------------------------------------------------------ machine load
class CpuUsage:
    """Cores used by this process (and its finished children) and by everything else since construction.

    From getrusage and /proc/stat deltas: ``others_cores`` = machine busy cores - ours. Only meaningful on
    Linux; on a GPU run it still says how busy the host was.
    """

    def __init__(self) -> None:
        self.wall, self.ours, self.machine = time.perf_counter(), _own_cpu_seconds(), _machine_jiffies()

    def summary(self) -> dict[str, float | None]:
        wall = max(time.perf_counter() - self.wall, 1e-9)
        ours = (_own_cpu_seconds() - self.ours) / wall
        machine = _machine_jiffies()
        busy = None
        if machine and self.machine:
            total = machine[0] - self.machine[0]
            if total > 0:
                busy = (machine[1] - self.machine[1]) / total * (os.cpu_count() or 1)
        return {"wall_s": round(wall, 2), "ours_cores": round(ours, 2),
                "others_cores": None if busy is None else round(max(busy - ours, 0.0), 2),
                "load_1min_at_end": round(os.getloadavg()[0], 2)}


def _own_cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _machine_jiffies() -> tuple[int, int] | None:
    """(total, busy) jiffies over all CPUs from /proc/stat; busy excludes idle and iowait."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(x) for x in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)
    return total, total - fields[3] - fields[4]


# ------------------------------------------------------------------------------------------ decode
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
    warm_up_generate(model, ids, plan.device, **extra)
    runs = [timed_generate(model, ids, new_tokens, plan.device, **extra) for _ in range(plan.repeats)]
    runs.sort(key=lambda run: run.total_s)
    return runs[len(runs) // 2]


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


def sample_lengths(first: int, last: int, samples: int) -> list[int]:
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


@dataclass
class DecodeRow:
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
    achieved = flops / total
    peak = gpu_peak_flops(plan)
    return DecodeRow(method, batch, prompt, new, total, batch * new / total, prefill, step,
                     {int(k): v for k, v in curve.items()}, growth(curve), measured, achieved,
                     achieved / peak if peak else None, usage.summary())


@dataclass(frozen=True)
class DecodeWeights:
    """Matmul weights (parameter counts) each method multiplies per position it processes."""

    ours: int          # source body + connector + target body + head (embedding tables left out)
    ours_head: int     # the head alone (the release loop runs it on the last position only)
    source: int        # source body + its own output head
    target: int        # target body + its (tied) output head


def decode_weights(composed: LLMModulesForCausalLM, target_lm: PreTrainedModel) -> DecodeWeights:
    source = composed.source
    head = composed.get_output_embeddings()
    tables = embedding_tables(source, composed.target, target_lm)
    ours = weight_count([source.base_model, composed.connector, composed.target, head], skip=tables)
    source_head = source.get_output_embeddings().weight.numel()
    target_head = target_lm.get_output_embeddings().weight.numel()
    return DecodeWeights(ours, head.weight.numel(), weight_count([source.base_model], skip=tables) + source_head,
                         weight_count([target_lm.base_model], skip=tables) + target_head)


def bench_decode(plan: Plan, composed: LLMModulesForCausalLM, target_lm: PreTrainedModel) -> list[DecodeRow]:
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
            log(f"  {row.tokens_per_s:.3f} tok/s, {_fmt(row.decode_step_s)} s/step, {row.cpu}")
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
    release = {(r.batch, r.new_tokens): r for r in rows if r.method == "release_recompute"}
    for row in rows:
        base = release.get((row.batch, row.new_tokens))
        if base is not None:
            row.speedup_vs_baseline = ratio(row.tokens_per_s, base.tokens_per_s)


# ------------------------------------------------------------------------------------------- bound
def copy_bandwidth(device: str, nbytes: int, repeats: int = 5) -> float:
    """Memory bandwidth in bytes/s from a large tensor copy (bytes read + bytes written per copy)."""
    source = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    destination = torch.empty_like(source)
    seconds = median_time(lambda: destination.copy_(source), device, repeats)
    return 2 * source.numel() * 4 / seconds


def decode_weight_bytes(composed: LLMModulesForCausalLM) -> int:
    """Weight bytes one cached decode step reads: source body, connector, target body and head, without the
    embedding tables (one row per token each; the composed model never runs the source's own head)."""
    tables = embedding_tables(composed.source.base_model, composed.target)
    parts = [composed.source.base_model, composed.connector, composed.target, composed.get_output_embeddings()]
    return weight_bytes(parts, skip=tables)


@dataclass
class BoundRow:
    batch: int
    weight_bytes_per_step: int
    bandwidth_bytes_per_s: float
    bound_tokens_per_s: float
    measured_tokens_per_s: float
    fraction_of_bound: float


def bench_bound(rows: list[DecodeRow], weights: int, bandwidth: float) -> list[BoundRow]:
    """One row per batch: the shortest case of ours; its median decode step against the weight-read bound."""
    bounds = []
    for batch in sorted({r.batch for r in rows}):
        ours = [r for r in rows if r.method == "ours_cached" and r.batch == batch and r.decode_step_s]
        if not ours:
            continue
        row = min(ours, key=lambda r: r.new_tokens)
        bound = row.batch * bandwidth / weights
        measured = row.batch / row.decode_step_s
        bounds.append(BoundRow(row.batch, weights, bandwidth, bound, measured, measured / bound))
    return bounds


# ---------------------------------------------------------------------------------------- training
@dataclass
class TrainRow:
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


def train_inputs(config: str, plan: Plan, model: nn.Module) -> dict[str, torch.Tensor]:
    """One batch for ``config``: token ids + labels, or cached source states + labels."""
    ids = random_ids(plan.train_batch, plan.train_seq, int(model.config.vocab_size), plan.device, seed=7)
    if config.startswith("fusion_"):
        from .bench_fusion import fusion_train_inputs

        return fusion_train_inputs(config, plan, model, ids)
    if config in ("target_only", "without_cache"):
        return {"input_ids": ids, "labels": ids}
    width = model.source_hidden_size
    states = torch.randn(plan.train_batch, plan.train_seq, width, generator=torch.Generator().manual_seed(7))
    return {"source_states": states.to(device=plan.device, dtype=plan.torch_dtype), "labels": ids}


def train_model(config: str, plan: Plan) -> nn.Module:
    if config.startswith("fusion_"):
        from .bench_fusion import fusion_train_model

        return fusion_train_model(config, plan)
    if config == "target_only":
        return random_causal_lm(target_config(plan.shapes), torch.float32, plan.device).train()
    source = None
    if config == "without_cache":
        source = random_causal_lm(source_config(plan.shapes), plan.torch_dtype, plan.device)
    return compose(plan.shapes, source, plan.device).train()


def train_flops(model: nn.Module, tokens: int) -> tuple[int, float]:
    """(trainable parameters, FLOPs per step): 6 per trainable matmul weight and 2 per frozen one that runs
    (the source body when loaded; never its own head), per token. Embedding tables do no matmul."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    tables = embedding_tables(model)
    trainable_matmul = sum(p.numel() for p in _parameters([model], tables) if p.requires_grad)
    source = getattr(model, "source", None)
    frozen_matmul = 0 if source is None else weight_count([source.base_model], embedding_tables(source))
    return trainable, float(tokens * (6 * trainable_matmul + 2 * frozen_matmul))


def autocast(plan: Plan) -> contextlib.AbstractContextManager:
    if plan.dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=plan.device.split(":")[0], dtype=torch.bfloat16)


CPU_MEMORY_MEASURE = ("peak RSS of a fresh subprocess per configuration (VmHWM from /proc/self/status, the "
                      "kernel's resident-set high-water mark of that process image, reset after imports through "
                      "/proc/self/clear_refs) minus its RSS after imports: weights, gradients, AdamW state, "
                      "activations and allocator slack of that configuration only")
CUDA_MEMORY_MEASURE = "torch.cuda.max_memory_allocated (weights + gradients + AdamW state + activations)"


def train_worker(config: str, plan: Plan) -> dict:
    """Build one configuration, run warm-up + timed AdamW steps, report step time and peak memory."""
    cuda = plan.device.startswith("cuda")
    baseline = 0 if cuda else current_rss()
    if not cuda:
        reset_peak_rss()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model = train_model(config, plan)
    batch = train_inputs(config, plan, model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    after_build = torch.cuda.memory_allocated() if cuda else current_rss() - baseline

    def step() -> None:
        with autocast(plan):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = median_time(step, plan.device, plan.train_steps, warmup=1)
    tokens = plan.train_batch * plan.train_seq
    trainable, flops = train_flops(model, tokens)
    if cuda:
        peak, how = torch.cuda.max_memory_allocated(), CUDA_MEMORY_MEASURE
    else:
        peak, how = peak_rss() - baseline, CPU_MEMORY_MEASURE
    achieved = flops / seconds
    peak_flops = gpu_peak_flops(plan)
    return asdict(TrainRow(config, plan.train_batch, plan.train_seq, seconds, tokens / seconds, int(peak),
                           int(after_build), how, trainable, flops, achieved,
                           achieved / peak_flops if peak_flops else None))


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def current_rss() -> int:
    return _status_bytes("VmRSS")


def peak_rss() -> int:
    """Resident-set high-water mark of this process image.

    Not getrusage's ru_maxrss: Linux carries that across fork + exec, so a worker started by a parent
    holding a 1.5B-parameter model would report the parent's size. VmHWM belongs to the current image.
    """
    return _status_bytes("VmHWM")


def reset_peak_rss() -> None:
    """Set VmHWM to the current RSS (Linux >= 4.0); harmless where unsupported."""
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def gpu_peak_flops(plan: Plan) -> float | None:
    if not plan.device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    return next((table[plan.dtype] for key, table in GPU_PEAK_FLOPS.items() if key in name), None)


def run_train_subprocess(config: str, plan: Plan) -> TrainRow:
    """``train_worker`` in a fresh interpreter (its peak memory is its own); the result is its last stdout line."""
    spec = json.dumps({"config": config, "plan": asdict(plan)})
    command = [sys.executable, "-m", "llm_modules.bench", "--train-worker", spec]
    usage = CpuUsage()
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"training worker for {config} failed with exit code {done.returncode}")
    row = TrainRow(**json.loads(done.stdout.strip().splitlines()[-1]))
    row.cpu = usage.summary()
    return row


def bench_train(plan: Plan, configs: Sequence[str] = TRAIN_CONFIGS) -> list[TrainRow]:
    rows = []
    for config in configs:
        log(f"train {config}: batch {plan.train_batch} x {plan.train_seq} tokens, fresh subprocess")
        rows.append(run_train_subprocess(config, plan))
        log(f"  {rows[-1].step_s:.3f} s/step, peak {rows[-1].peak_memory_bytes / GIB:.2f} GiB, {rows[-1].cpu}")
    by_name = {row.config: row for row in rows}
    for row in rows:
        uncached = by_name.get("fusion_without_cache" if row.config.startswith("fusion_") else "without_cache")
        row.speedup_vs_without_cache = ratio(uncached.step_s, row.step_s) if uncached else None
        row.memory_vs_target_only = ratio(row.peak_memory_bytes, by_name["target_only"].peak_memory_bytes)
    return rows


# ----------------------------------------------------------------------------------------- results
def machine_description(device: str) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu": _cpu_model(), "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1),
            "load_average_1_5_15_min_at_end": os.getloadavg()}
    import transformers

    info["transformers"] = transformers.__version__
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / GIB, 1)
        info["cuda"] = torch.version.cuda
    return info


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def git_commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=False).stdout.strip()

    commit = git("rev-parse", "HEAD") or "unknown"
    changed = git("diff", "--name-only", "HEAD").split()
    return commit + (f" (uncommitted changes in: {', '.join(changed)})" if changed else "")


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


def markdown(result: dict) -> str:
    plan, lines = result["plan"], []
    lines += [f"# llm-modules benchmark: {plan['shapes']} shapes, {plan['device']}, {plan['dtype']}", "",
              f"- commit: `{result['commit']}`", f"- machine: {json.dumps(result['machine'])}",
              f"- wall time of the run: {result['wall_s']:.0f} s", *[f"- note: {n}" for n in plan["notes"]], "",
              "## Headline", "", "| key | value |", "|---|---|"]
    lines += [f"| `{k}` | {_fmt(v)} |" for k, v in result["headline"].items()]
    lines += ["", "## Decode (greedy, batch x prompt + new tokens)", "",
              "`cores` = cores used by this benchmark / by other processes while the row was measured.", "",
              "| method | batch | prompt | new | tokens/s | prefill s | s/token after prefill | vs baseline | "
              "per-token s at attended length | growth | TFLOP/s | MFU | cores | measured |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["decode"]:
        curve = ", ".join(f"{k}: {v:.4g}" for k, v in r["per_token_s"].items())
        lines.append(f"| {r['method']} | {r['batch']} | {r['prompt']} | {r['new_tokens']} | {r['tokens_per_s']:.4g} | "
                     f"{_fmt(r['prefill_s'])} | {_fmt(r['decode_step_s'])} | {_fmt(r['speedup_vs_baseline'])}x {r['baseline']} | "
                     f"{curve} | {_fmt(r['per_token_growth'])} | {_fmt(_tera(r['achieved_flops']))} | {_fmt(r['mfu'])} | "
                     f"{_cores(r['cpu'])} | {r['measured']} |")
    lines += ["", "## Training step (AdamW, same batch and sequence length)", "",
              "| config | batch x seq | s/step | tokens/s | vs without cache | peak memory GiB | vs target only | "
              "memory after build GiB | trainable params | TFLOP/s | MFU | cores |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["train"]:
        lines.append(f"| {r['config']} | {r['batch']} x {r['seq']} | {r['step_s']:.3f} | {r['tokens_per_s']:.1f} | "
                     f"{_fmt(r['speedup_vs_without_cache'])}x | {r['peak_memory_bytes'] / GIB:.2f} | "
                     f"{_fmt(r['memory_vs_target_only'])}x | {r['memory_after_build_bytes'] / GIB:.2f} | "
                     f"{r['trainable_parameters'] / 1e6:.1f} M | {r['achieved_flops'] / 1e12:.3f} | {_fmt(r['mfu'])} | "
                     f"{_cores(r['cpu'])} |")
    if result["train"]:
        lines.append(f"\nPeak memory: {result['train'][0]['memory_measure']}.")
    lines += ["", "## Bandwidth bound of cached decode (ours)", "",
              "| batch | weight GB read per step | copy bandwidth GB/s | bound tokens/s | measured tokens/s (after prefill) | fraction |",
              "|---|---|---|---|---|---|"]
    for b in result["bound"]:
        lines.append(f"| {b['batch']} | {b['weight_bytes_per_step'] / 1e9:.3f} | {b['bandwidth_bytes_per_s'] / 1e9:.1f} | "
                     f"{b['bound_tokens_per_s']:.3g} | {b['measured_tokens_per_s']:.3g} | {b['fraction_of_bound']:.2f} |")
    lines += ["", "## Machine load per stage", "", "| stage | wall s | cores used by us | cores used by others | "
              "load (1 min) at end |", "|---|---|---|---|---|"]
    for name, usage in result["load"].items():
        lines.append(f"| {name} | {usage['wall_s']:.0f} | {_fmt(usage['ours_cores'])} | {_fmt(usage['others_cores'])} | "
                     f"{_fmt(usage['load_1min_at_end'])} |")
    return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def _tera(value: float | None) -> float | None:
    return None if value is None else value / 1e12


def _cores(usage: dict | None) -> str:
    return "n/a" if not usage else f"{_fmt(usage['ours_cores'])} / {_fmt(usage['others_cores'])}"


def write_results(result: dict, folder: Path) -> tuple[Path, Path]:
    plan = result["plan"]
    topology = "fusion-" if result.get("topology") == "fusion" else ""
    stem = (f"bench-{topology}{plan['shapes']}-{plan['device'].split(':')[0]}-{plan['dtype']}"
            f"{'-quick' if plan['quick'] else ''}")
    folder.mkdir(parents=True, exist_ok=True)
    json_path, md_path = folder / f"{stem}.json", folder / f"{stem}.md"
    json_path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    md_path.write_text(markdown(result))
    return json_path, md_path


# --------------------------------------------------------------------------------------------- run
@contextlib.contextmanager
def stage(name: str, load: dict[str, dict]) -> Iterator[None]:
    usage = CpuUsage()
    log(f"{name} ...")
    yield
    load[name] = usage.summary()
    log(f"{name} done: {load[name]}")


def run(plan: Plan, skip: set[str]) -> dict:
    start = time.perf_counter()
    load_at_start = os.getloadavg()
    load: dict[str, dict] = {}
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
    return {
        "plan": asdict(plan), "commit": git_commit(),
        "machine": dict(machine_description(plan.device), load_average_1_5_15_min_at_start=load_at_start),
        "headline": headline(decode, train, bounds), "load": load,
        "decode": [asdict(r) for r in decode], "train": [asdict(r) for r in train],
        "bound": [asdict(b) for b in bounds], "copy_bandwidth_bytes_per_s": bandwidth,
        "wall_s": time.perf_counter() - start,
    }


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="llm-modules bench", description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", choices=("paper", "tiny"), default="paper")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="weights and autocast dtype (default: bfloat16 on cuda, float32 on cpu)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and cases (see the notes it prints)")
    parser.add_argument("--skip", action="append", choices=("decode", "train"), default=[])
    parser.add_argument("--output-dir", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--topology", choices=("bridge", "fusion"), default="bridge",
                        help="fusion: the fusion topology's run (prompt memory decode, cached training) against "
                             "the source alone and the target alone")
    parser.add_argument("--train-worker", help=argparse.SUPPRESS)
    return parser.parse_args(list(argv))


def bench_main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.train_worker:
        spec = json.loads(args.train_worker)
        plan = Plan.from_dict(spec["plan"])
        if plan.threads:
            torch.set_num_threads(plan.threads)
        print(json.dumps(train_worker(spec["config"], plan)), flush=True)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("llm-modules bench: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    plan = make_plan(args.shapes, args.device, args.dtype, args.quick, args.threads)
    for note in plan.notes:
        log(f"note: {note}")
    if args.device == "cpu" and os.getloadavg()[0] > 1.0:
        log(f"warning: load average {os.getloadavg()[0]:.1f}: other processes use the CPU, timings will suffer; "
            "--threads N (N = free cores) avoids waiting on descheduled threads")
    if args.topology == "fusion":
        from .bench_fusion import run_fusion

        result = run_fusion(plan, set(args.skip))
    else:
        result = run(plan, set(args.skip))
    json_path, md_path = write_results(result, args.output_dir)
    print(markdown(result))
    log(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(bench_main())
