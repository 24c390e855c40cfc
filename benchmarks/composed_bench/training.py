"""Training steps: one fresh subprocess per configuration, step time, FLOPs and peak memory."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from .load import CpuUsage
from .machine import gpu_peak_flops
from .memory import CPU_MEMORY_MEASURE, CUDA_MEMORY_MEASURE, GIB, current_rss, peak_rss, reset_peak_rss
from .plan import Plan
from .progress import log
from .rows import TrainRow, ratio
from .timing import median_time
from .train_configs import TRAIN_CONFIGS, train_inputs, train_model
from .weights import embedding_tables, unique_parameters, weight_count


def train_flops(model: nn.Module, tokens: int) -> tuple[int, float]:
    """(trainable parameters, FLOPs per step): 6 per trainable matmul weight and 2 per frozen one that runs
    (the source body when loaded; never its own head), per token. Embedding tables do no matmul."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    tables = embedding_tables(model)
    trainable_matmul = sum(p.numel() for p in unique_parameters([model], tables) if p.requires_grad)
    source = getattr(model, "source", None)
    frozen_matmul = 0 if source is None else weight_count([source.base_model], embedding_tables(source))
    return trainable, float(tokens * (6 * trainable_matmul + 2 * frozen_matmul))


def autocast(plan: Plan) -> contextlib.AbstractContextManager:
    """bf16 autocast for a bfloat16 plan; nothing for float32."""
    if plan.dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=plan.device.split(":")[0], dtype=torch.bfloat16)


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


# the command line whose hidden --train-worker option runs one configuration (main.bench_main)
BENCH_SCRIPT = Path(__file__).resolve().parents[1] / "bench.py"


def run_train_subprocess(config: str, plan: Plan) -> TrainRow:
    """``train_worker`` in a fresh interpreter (its peak memory is its own); the result is its last stdout line."""
    spec = json.dumps({"config": config, "plan": asdict(plan)})
    command = [sys.executable, str(BENCH_SCRIPT), "--train-worker", spec]
    usage = CpuUsage()
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"training worker for {config} failed with exit code {done.returncode}")
    row = TrainRow(**json.loads(done.stdout.strip().splitlines()[-1]))
    row.cpu = usage.summary()
    return row


def bench_train(plan: Plan, configs: Sequence[str] = TRAIN_CONFIGS) -> list[TrainRow]:
    """Each configuration in a fresh subprocess; speed-ups over no cache and memory over the target alone."""
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
