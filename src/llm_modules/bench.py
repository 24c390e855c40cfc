"""``llm-modules bench``: decode, training and memory benchmarks against the alternatives, in one run.

Models are built at the paper's real shapes with random weights (performance does not depend on
weight values): a Qwen2-1.5B-shaped source and a GPT-Neo-125M-shaped target, both from their
``transformers`` config classes, nothing from a hub. Every number is a median over repeats after a
warm-up, and every row carries its ratio to a baseline measured in the same run.

Measured:
  decode    tokens/s of the composed model with its caches, a release-style loop that recomputes
            the whole prefix per token, the source alone (HF ``generate``) and the target alone;
            per-token time at several lengths.
  train     step time and peak memory: composed without cache, composed from the source-state
            cache (source not loaded), the target fine-tuned alone. One fresh subprocess each, so
            that CPU peak memory (process peak RSS) belongs to one configuration.
  bound     weight bytes read per decoded token / measured copy bandwidth, and the fraction reached.
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

from .modeling import LLMModulesForCausalLM
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
    """What one run measures; chosen from ``--shapes`` and ``--quick``."""

    shapes: str
    device: str
    dtype: str
    quick: bool
    batches: tuple[int, ...]
    prompt: int
    new_tokens: tuple[int, ...]          # every method
    flat_new_tokens: int                 # ours only, batch 1: the long run for the per-token curve
    repeats: int
    recompute_samples: int               # prefix lengths timed for the release loop (0 = every step)
    train_batch: int
    train_seq: int
    train_steps: int
    bandwidth_bytes: int
    notes: tuple[str, ...] = field(default=())

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.dtype == "bfloat16" else torch.float32


def make_plan(shapes: str, device: str, dtype: str, quick: bool) -> Plan:
    slow_cpu = shapes == "paper" and device == "cpu"
    notes: list[str] = []
    if shapes == "tiny":
        return Plan(shapes, device, dtype, quick, batches=(1, 2), prompt=16, new_tokens=(16,),
                    flat_new_tokens=16 if quick else 48, repeats=1 if quick else 3, recompute_samples=0,
                    train_batch=2, train_seq=32, train_steps=2 if quick else 3, bandwidth_bytes=64 * 2**20)
    new_tokens = (128,) if quick else (128, 512)
    if quick:
        notes.append("--quick: 128 new tokens for every method; 512 new tokens for ours at batch 1 only "
                     "(the per-token curve); 1 timed repeat after a warm-up")
    samples = 0
    if slow_cpu:
        samples = 4 if quick else 8
        notes.append(f"release loop on CPU: full-prefix steps timed at {samples} evenly spaced prefix lengths "
                     "(every step costs about the same as its neighbours), total = piecewise-linear sum over "
                     "every step; a full loop is hours at batch 8")
    return Plan(shapes, device, dtype, quick, batches=(1, 8), prompt=128, new_tokens=new_tokens,
                flat_new_tokens=512, repeats=1 if (quick and slow_cpu) else 3, recompute_samples=samples,
                train_batch=4, train_seq=128, train_steps=2 if slow_cpu else 5, bandwidth_bytes=GIB,
                notes=tuple(notes))


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
    skipped = {id(p) for module in skip for p in module.parameters()}
    seen: set[int] = set()
    total = 0
    for module in modules:
        for parameter in module.parameters():
            if id(parameter) not in seen and id(parameter) not in skipped:
                seen.add(id(parameter))
                total += parameter.numel() * parameter.element_size()
    return total


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
    step_s: list[float]                  # per decoded token after the first (index i: total length prompt+i+1)
    tokens: torch.Tensor | None = None   # the generated sequence (for the release loop's prefixes)


def timed_generate(model: PreTrainedModel, ids: torch.Tensor, new_tokens: int, device: str) -> DecodeRun:
    """Greedy HF ``generate`` of exactly ``new_tokens`` tokens, timed per step."""
    clock = StepClock(device)
    synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, do_sample=False, logits_processor=LogitsProcessorList([clock]),
            pad_token_id=0,
        )
    synchronize(device)
    total = time.perf_counter() - start
    steps = [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]
    return DecodeRun(total, steps, out)


def median_generate(model: PreTrainedModel, ids: torch.Tensor, new_tokens: int, plan: Plan) -> DecodeRun:
    timed_generate(model, ids, min(new_tokens, 4), plan.device)  # warm-up
    runs = [timed_generate(model, ids, new_tokens, plan.device) for _ in range(plan.repeats)]
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
    return sorted({round(first + i * (last - first) / (samples - 1)) for i in range(samples)})


def interpolated_sum(points: dict[int, float], first: int, last: int) -> float:
    """Sum over every length in [first, last] of a per-length time known at ``points`` (piecewise linear)."""
    known = sorted(points)
    total = 0.0
    for length in range(first, last + 1):
        right = next(k for k in known if k >= length)
        left = max(k for k in known if k <= length)
        weight = 0.0 if right == left else (length - left) / (right - left)
        total += (1 - weight) * points[left] + weight * points[right]
    return total


def time_release_loop(model: LLMModulesForCausalLM, tokens: torch.Tensor, prompt: int, new_tokens: int,
                      plan: Plan) -> tuple[float, dict[int, float]]:
    """Total time of the release loop for ``new_tokens`` after ``prompt``, and its step time per prefix length.

    ``plan.recompute_samples == 0``: the whole loop runs (median total over repeats). Otherwise single
    steps run on prefixes cut from ``tokens`` (our greedy output, which is what the loop would
    produce) at a few lengths, and the total is their piecewise-linear sum over every step.
    """
    prefix = tokens[:, :prompt]
    if plan.recompute_samples == 0:
        release_loop(model, prefix, min(new_tokens, 2), plan.device)  # warm-up
        runs = sorted((release_loop(model, prefix, new_tokens, plan.device) for _ in range(plan.repeats)),
                      key=lambda times: sum(times.values()))
        points = runs[len(runs) // 2]
        return sum(points.values()), points
    lengths = sample_lengths(prompt, prompt + new_tokens - 1, plan.recompute_samples)
    with torch.inference_mode():
        recompute_step(model, prefix)  # warm-up
        points = {n: median_time(lambda n=n: recompute_step(model, tokens[:, :n]), plan.device, plan.repeats, warmup=0)
                  for n in lengths}
    return interpolated_sum(points, prompt, prompt + new_tokens - 1), points


def per_token_curve(steps: list[float], prompt: int, points: int = 5, window: int = 4) -> dict[int, float]:
    """Median step time around a few evenly spaced total lengths: {total length: seconds per token}."""
    if not steps:
        return {}
    marks = sample_lengths(0, len(steps) - 1, min(points, len(steps)))
    curve = {}
    for index in marks:
        chunk = steps[max(0, index - window): index + window + 1]
        curve[prompt + index + 2] = statistics.median(chunk)
    return curve


@dataclass
class DecodeRow:
    method: str
    batch: int
    prompt: int
    new_tokens: int
    total_s: float
    tokens_per_s: float
    decode_step_s: float | None          # median per-token time after prefill
    per_token_s: dict[int, float]
    measured: str
    baseline: str = "release_recompute"
    speedup_vs_baseline: float | None = None


def decode_row(method: str, batch: int, prompt: int, new_tokens: int, run: DecodeRun, measured: str) -> DecodeRow:
    return DecodeRow(method, batch, prompt, new_tokens, run.total_s, batch * new_tokens / run.total_s,
                     statistics.median(run.step_s) if run.step_s else None, per_token_curve(run.step_s, prompt),
                     measured)


def bench_decode(plan: Plan, composed: LLMModulesForCausalLM, target_lm: PreTrainedModel) -> list[DecodeRow]:
    rows: list[DecodeRow] = []
    source_vocab = int(composed.source.config.vocab_size)
    target_vocab = int(target_lm.config.vocab_size)
    for batch in plan.batches:
        ids = random_ids(batch, plan.prompt, source_vocab, plan.device, seed=batch)
        target_ids = random_ids(batch, plan.prompt, target_vocab, plan.device, seed=batch)
        for new in plan.new_tokens:
            log(f"decode batch {batch}, prompt {plan.prompt}, {new} new tokens: ours (cached)")
            ours = median_generate(composed, ids, new, plan)
            rows.append(decode_row("ours_cached", batch, plan.prompt, new, ours, "HF generate, ComposedCache"))
            log(f"  ours {rows[-1].tokens_per_s:.2f} tok/s; release-style loop (full prefix per token)")
            total, points = time_release_loop(composed, ours.tokens, plan.prompt, new, plan)
            how = "every step" if len(points) == new else f"{len(points)} sampled prefix lengths, interpolated"
            rows.append(DecodeRow("release_recompute", batch, plan.prompt, new, total, batch * new / total,
                                  statistics.median(points.values()), {k + 1: v for k, v in points.items()},
                                  f"full forward + argmax per token ({how})"))
            log(f"  release {rows[-1].tokens_per_s:.3f} tok/s; source alone (HF generate)")
            source_run = median_generate(composed.source, ids, new, plan)
            rows.append(decode_row("source_generate", batch, plan.prompt, new, source_run, "HF generate, DynamicCache"))
            log(f"  source {rows[-1].tokens_per_s:.2f} tok/s; target alone (HF generate)")
            target_run = median_generate(target_lm, target_ids, new, plan)
            rows.append(decode_row("target_generate", batch, plan.prompt, new, target_run, "HF generate, DynamicCache"))
    if plan.flat_new_tokens not in plan.new_tokens:
        log(f"decode batch 1, {plan.flat_new_tokens} new tokens: ours (per-token curve)")
        ids = random_ids(1, plan.prompt, source_vocab, plan.device, seed=1)
        run = median_generate(composed, ids, plan.flat_new_tokens, plan)
        rows.append(decode_row("ours_cached", 1, plan.prompt, plan.flat_new_tokens, run, "HF generate, ComposedCache"))
        rows[-1].baseline = "none (per-token curve)"
    attach_decode_baselines(rows)
    return rows


def attach_decode_baselines(rows: list[DecodeRow]) -> None:
    release = {(r.batch, r.new_tokens): r for r in rows if r.method == "release_recompute"}
    for row in rows:
        base = release.get((row.batch, row.new_tokens))
        if base is not None:
            row.speedup_vs_baseline = ratio(row.tokens_per_s, base.tokens_per_s)


def flatness(row: DecodeRow) -> float | None:
    """Per-token time at the longest length over the shortest (1.0 = flat)."""
    if len(row.per_token_s) < 2:
        return None
    lengths = sorted(row.per_token_s)
    return row.per_token_s[lengths[-1]] / row.per_token_s[lengths[0]]


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
    tables = [m for part in (composed.source.base_model, composed.target) for m in part.modules()
              if isinstance(m, nn.Embedding)]
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
    bounds = []
    for row in rows:
        if row.method == "ours_cached" and row.decode_step_s and row.new_tokens == min(r.new_tokens for r in rows):
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
    peak_memory_bytes: int
    memory_measure: str
    trainable_parameters: int
    flops_per_step: float
    achieved_flops: float
    mfu: float | None
    speedup_vs_without_cache: float | None = None
    memory_vs_target_only: float | None = None


def train_inputs(config: str, plan: Plan, model: nn.Module) -> dict[str, torch.Tensor]:
    """One batch for ``config``: token ids + labels, or cached source states + labels."""
    if config == "target_only":
        ids = random_ids(plan.train_batch, plan.train_seq, int(model.config.vocab_size), plan.device, seed=7)
        return {"input_ids": ids, "labels": ids}
    ids = random_ids(plan.train_batch, plan.train_seq, int(model.config.vocab_size), plan.device, seed=7)
    if config == "without_cache":
        return {"input_ids": ids, "labels": ids}
    width = model.source_hidden_size
    states = torch.randn(plan.train_batch, plan.train_seq, width, generator=torch.Generator().manual_seed(7))
    return {"source_states": states.to(plan.device), "labels": ids}


def train_model(config: str, plan: Plan) -> nn.Module:
    if config == "target_only":
        return random_causal_lm(target_config(plan.shapes), torch.float32, plan.device).train()
    source = None
    if config == "without_cache":
        source = random_causal_lm(source_config(plan.shapes), plan.torch_dtype, plan.device)
    return compose(plan.shapes, source, plan.device).train()


def train_flops(model: nn.Module, tokens: int) -> tuple[int, float]:
    """(trainable parameters, FLOPs per step): 6 per trainable and 2 per frozen matmul weight per token."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for m in model.modules() if isinstance(m, nn.Linear) for p in m.parameters()
                 if not p.requires_grad)
    return trainable, float(tokens * (6 * trainable + 2 * frozen))


def autocast(plan: Plan) -> contextlib.AbstractContextManager:
    if plan.dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=plan.device.split(":")[0], dtype=torch.bfloat16)


def train_worker(config: str, plan: Plan) -> dict:
    """Build one configuration, run warm-up + timed AdamW steps, report step time and peak memory."""
    baseline_rss = current_rss()
    if plan.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    model = train_model(config, plan)
    batch = train_inputs(config, plan, model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step() -> None:
        with autocast(plan):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = median_time(step, plan.device, plan.train_steps, warmup=1)
    trainable, flops = train_flops(model, plan.train_batch * plan.train_seq)
    if plan.device.startswith("cuda"):
        peak, how = torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated (weights + grads + optimizer + activations)"
    else:
        peak = peak_rss() - baseline_rss
        how = "process peak RSS (getrusage ru_maxrss) minus RSS after imports, fresh subprocess per configuration"
    achieved = flops / seconds
    peak_flops = gpu_peak_flops(plan)
    return asdict(TrainRow(config, plan.train_batch, plan.train_seq, seconds, int(peak), how, trainable, flops,
                           achieved, achieved / peak_flops if peak_flops else None))


def current_rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def gpu_peak_flops(plan: Plan) -> float | None:
    if not plan.device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    return next((table[plan.dtype] for key, table in GPU_PEAK_FLOPS.items() if key in name), None)


def run_train_subprocess(config: str, plan: Plan) -> TrainRow:
    """``train_worker`` in a fresh interpreter (its peak memory is its own); the result is its last stdout line."""
    spec = json.dumps({"config": config, "plan": asdict(plan)})
    command = [sys.executable, "-m", "llm_modules.bench", "--train-worker", spec]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"training worker for {config} failed with exit code {done.returncode}")
    return TrainRow(**json.loads(done.stdout.strip().splitlines()[-1]))


def bench_train(plan: Plan) -> list[TrainRow]:
    rows = []
    for config in TRAIN_CONFIGS:
        log(f"train {config}: batch {plan.train_batch} x {plan.train_seq} tokens, fresh subprocess")
        rows.append(run_train_subprocess(config, plan))
        log(f"  {rows[-1].step_s:.3f} s/step, peak {rows[-1].peak_memory_bytes / GIB:.2f} GiB")
    by_name = {row.config: row for row in rows}
    for row in rows:
        row.speedup_vs_without_cache = ratio(by_name["without_cache"].step_s, row.step_s)
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
    return commit + (" (working tree has local changes)" if git("status", "--porcelain", "--untracked-files=no") else "")


def headline(decode: list[DecodeRow], train: list[TrainRow], bounds: list[BoundRow], plan: Plan) -> dict:
    def pick(method: str) -> DecodeRow | None:
        first = min(plan.new_tokens)
        return next((r for r in decode if r.method == method and r.batch == 1 and r.new_tokens == first), None)

    ours, source = pick("ours_cached"), pick("source_generate")
    by_name = {row.config: row for row in train}
    return {
        "decode_speedup_vs_recompute_256": ours.speedup_vs_baseline if ours else None,
        "decode_speedup_vs_source_generate": ratio(ours.tokens_per_s, source.tokens_per_s) if ours and source else None,
        "train_speedup_with_cache": by_name["with_cache"].speedup_vs_without_cache,
        "train_peak_memory_vs_target_only": by_name["with_cache"].memory_vs_target_only,
        "decode_fraction_of_bandwidth_bound": next((b.fraction_of_bound for b in bounds if b.batch == 1), None),
    }


def markdown(result: dict) -> str:
    plan, lines = result["plan"], []
    lines += [f"# llm-modules benchmark: {plan['shapes']} shapes, {plan['device']}, {plan['dtype']}", "",
              f"- commit: `{result['commit']}`", f"- machine: {json.dumps(result['machine'])}",
              f"- wall time of the run: {result['wall_s']:.0f} s", *[f"- note: {n}" for n in plan["notes"]], "",
              "## Headline", "", "| key | value |", "|---|---|"]
    lines += [f"| `{k}` | {_fmt(v)} |" for k, v in result["headline"].items()]
    lines += ["", "## Decode (greedy, batch x prompt + new tokens)", "",
              "| method | batch | prompt | new | tokens/s | s/token after prefill | vs release loop | per-token s at total length | measured |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in result["decode"]:
        curve = ", ".join(f"{k}: {v:.4f}" for k, v in r["per_token_s"].items())
        lines.append(f"| {r['method']} | {r['batch']} | {r['prompt']} | {r['new_tokens']} | {r['tokens_per_s']:.3f} | "
                     f"{_fmt(r['decode_step_s'])} | {_fmt(r['speedup_vs_baseline'])}x | {curve} | {r['measured']} |")
    lines += ["", "## Training step (AdamW, same batch and sequence length)", "",
              "| config | batch x seq | s/step | vs without cache | peak memory GiB | vs target only | trainable params | TFLOP/s | MFU |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in result["train"]:
        lines.append(f"| {r['config']} | {r['batch']} x {r['seq']} | {r['step_s']:.3f} | {_fmt(r['speedup_vs_without_cache'])}x | "
                     f"{r['peak_memory_bytes'] / GIB:.2f} | {_fmt(r['memory_vs_target_only'])}x | "
                     f"{r['trainable_parameters'] / 1e6:.1f} M | {r['achieved_flops'] / 1e12:.3f} | {_fmt(r['mfu'])} |")
    if result["train"]:
        lines.append(f"\nPeak memory: {result['train'][0]['memory_measure']}.")
    lines += ["", "## Bandwidth bound of cached decode (ours)", "",
              "| batch | weight GB read per step | copy bandwidth GB/s | bound tokens/s | measured tokens/s (after prefill) | fraction |",
              "|---|---|---|---|---|---|"]
    for b in result["bound"]:
        lines.append(f"| {b['batch']} | {b['weight_bytes_per_step'] / 1e9:.3f} | {b['bandwidth_bytes_per_s'] / 1e9:.1f} | "
                     f"{b['bound_tokens_per_s']:.2f} | {b['measured_tokens_per_s']:.2f} | {b['fraction_of_bound']:.2f} |")
    return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def write_results(result: dict, folder: Path) -> tuple[Path, Path]:
    plan = result["plan"]
    stem = f"bench-{plan['shapes']}-{plan['device'].split(':')[0]}-{plan['dtype']}{'-quick' if plan['quick'] else ''}"
    folder.mkdir(parents=True, exist_ok=True)
    json_path, md_path = folder / f"{stem}.json", folder / f"{stem}.md"
    json_path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    md_path.write_text(markdown(result))
    return json_path, md_path


# --------------------------------------------------------------------------------------------- run
@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    start = time.perf_counter()
    log(f"{name} ...")
    yield
    log(f"{name} done in {time.perf_counter() - start:.1f} s")


def run(plan: Plan, skip: set[str]) -> dict:
    start = time.perf_counter()
    load_at_start = os.getloadavg()
    decode: list[DecodeRow] = []
    bounds: list[BoundRow] = []
    if "decode" not in skip:
        with stage("build source + composed + target-only models"):
            source = random_causal_lm(source_config(plan.shapes), plan.torch_dtype, plan.device)
            composed = compose(plan.shapes, source, plan.device).to(plan.torch_dtype).eval()
            target_lm = random_causal_lm(target_config(plan.shapes), plan.torch_dtype, plan.device)
        with stage("copy bandwidth"):
            bandwidth = copy_bandwidth(plan.device, plan.bandwidth_bytes)
        with stage("decode"):
            decode = bench_decode(plan, composed, target_lm)
        bounds = bench_bound(decode, decode_weight_bytes(composed), bandwidth)
        del source, composed, target_lm
        gc.collect()
    train: list[TrainRow] = []
    if "train" not in skip:
        with stage("training"):
            train = bench_train(plan)
    return {
        "plan": asdict(plan), "commit": git_commit(),
        "machine": dict(machine_description(plan.device), load_average_1_5_15_min_at_start=load_at_start),
        "headline": headline(decode, train, bounds, plan) if decode and train else dict.fromkeys(HEADLINE_KEYS),
        "decode": [asdict(r) for r in decode], "train": [asdict(r) for r in train],
        "bound": [asdict(b) for b in bounds], "wall_s": time.perf_counter() - start,
    }


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="llm-modules bench", description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", choices=("paper", "tiny"), default="paper")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and lengths (CPU at paper shapes)")
    parser.add_argument("--skip", action="append", choices=("decode", "train"), default=[])
    parser.add_argument("--output-dir", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--train-worker", help=argparse.SUPPRESS)
    return parser.parse_args(list(argv))


def bench_main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.train_worker:
        spec = json.loads(args.train_worker)
        plan_fields = dict(spec["plan"], batches=tuple(spec["plan"]["batches"]),
                           new_tokens=tuple(spec["plan"]["new_tokens"]), notes=tuple(spec["plan"]["notes"]))
        print(json.dumps(train_worker(spec["config"], Plan(**plan_fields))), flush=True)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("llm-modules bench: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    plan = make_plan(args.shapes, args.device, args.dtype, args.quick)
    for note in plan.notes:
        log(f"note: {note}")
    if args.device == "cpu" and os.getloadavg()[0] > 1.0:
        log(f"warning: load average {os.getloadavg()[0]:.1f}: other processes use the CPU, timings will suffer")
    result = run(plan, set(args.skip))
    json_path, md_path = write_results(result, args.output_dir)
    print(markdown(result))
    log(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(bench_main())
