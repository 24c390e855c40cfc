"""Where the time goes, for the benchmark targets that are missed: torch.profiler + per-stage clocks.

    python benchmarks/where_time_goes.py decode --threads 1     # cached decode step vs release recompute step
    python benchmarks/where_time_goes.py train --threads 1      # training step with / without the source-state cache

Same models, shapes and inputs as ``llm-modules bench`` (benchmarks/composed_bench). Writes
benchmarks/results/profile-{decode,train}-{device}-{dtype}.txt: per-stage wall times (forward hooks on
source / connector / target / head; forward, backward and optimizer timed apart), the top operators
by self time from torch.profiler, and the weight/optimizer/activation bytes of each training config.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from composed_bench.bound import copy_bandwidth, decode_weight_bytes
from composed_bench.inputs import random_ids
from composed_bench.memory import GIB
from composed_bench.models import compose, random_causal_lm, source_config
from composed_bench.plan import make_plan
from composed_bench.release_loop import recompute_step
from composed_bench.timing import synchronize
from composed_bench.train_configs import train_inputs, train_model
from composed_bench.training import autocast, train_flops
from composed_bench.weights import embedding_tables, weight_bytes


class StageClock:
    """Wall time spent inside named modules' forward (pre/post hooks), accumulated."""

    def __init__(self, stages: dict[str, nn.Module], device: str) -> None:
        self.device, self.seconds, self.handles = device, defaultdict(float), []
        self.started: dict[str, float] = {}
        for name, module in stages.items():
            self.handles.append(module.register_forward_pre_hook(lambda m, a, name=name: self._start(name)))
            self.handles.append(module.register_forward_hook(lambda m, a, o, name=name: self._stop(name)))

    def _start(self, name: str) -> None:
        synchronize(self.device)
        self.started[name] = time.perf_counter()

    def _stop(self, name: str) -> None:
        synchronize(self.device)
        self.seconds[name] += time.perf_counter() - self.started.pop(name)

    def reset(self) -> None:
        self.seconds.clear()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def composed_stages(model: nn.Module) -> dict[str, nn.Module]:
    stages = {"connector": model.connector, "target body": model.target, "head": model.head}
    if model.source is not None:
        stages = {"source body": model.source.base_model, **stages}
    return stages


def op_table(prof: profile, rows: int = 15) -> str:
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=40)


def cached_decode_profile(model, clock: StageClock, stage_bytes: dict[str, int], total_bytes: int, bandwidth: float,
                          batch: int, steps: int, plan, out: io.StringIO) -> float:
    """Stage times and top operators of cached decode steps at ``batch`` after a ``plan.prompt`` prefill."""
    ids = random_ids(batch, plan.prompt, int(model.source.config.vocab_size), plan.device, seed=1)
    result = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache, mask = result.cache, torch.ones_like(ids)

    def step() -> None:
        nonlocal result, mask
        token = result.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        result = model(input_ids=token, attention_mask=mask, cache=cache, use_cache=True, logits_to_keep=1)

    step()  # warm-up
    clock.reset()
    times = []
    for _ in range(steps):
        synchronize(plan.device)
        start = time.perf_counter()
        step()
        synchronize(plan.device)
        times.append(time.perf_counter() - start)
    per_step = statistics.median(times)
    print(f"\n## Cached decode step, batch {batch}, cache length {plan.prompt}..{plan.prompt + steps}: "
          f"median {per_step:.3f} s/step (weight-read bound {total_bytes / bandwidth:.3f})", file=out)
    print("| stage | s/step | share | weight GB | bound s (bytes / bandwidth) | fraction of bound |", file=out)
    print("|---|---|---|---|---|---|", file=out)
    for name, seconds in clock.seconds.items():
        stage = seconds / (steps)
        bound = stage_bytes[name] / bandwidth
        print(f"| {name} | {stage:.4f} | {stage / per_step:.0%} | {stage_bytes[name] / 1e9:.3f} | {bound:.4f} | "
              f"{bound / stage:.2f} |", file=out)
    rest = per_step - sum(clock.seconds.values()) / steps
    print(f"| outside these modules (masks, argmax, cat) | {rest:.4f} | {rest / per_step:.0%} | | | |", file=out)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(3):
            step()
    print(f"\nTop operators, 3 cached decode steps at batch {batch} (torch.profiler, self CPU time):", file=out)
    print(op_table(prof), file=out)
    print(f"\nTop operators by input shape, batch {batch}:", file=out)
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=8,
                                                              max_name_column_width=30, max_shapes_column_width=60),
          file=out)
    return per_step


def profile_decode(plan, out: io.StringIO, steps: int = 8) -> None:
    source = random_causal_lm(source_config(plan.shapes), plan.torch_dtype, plan.device)
    model = compose(plan.shapes, source, plan.device).to(plan.torch_dtype).eval()
    bandwidth = copy_bandwidth(plan.device, plan.bandwidth_bytes)
    stage_bytes = {name: weight_bytes([m], skip=embedding_tables(m)) for name, m in composed_stages(model).items()}
    total_bytes = decode_weight_bytes(model)
    clock = StageClock(composed_stages(model), plan.device)
    print(f"copy bandwidth {bandwidth / 1e9:.2f} GB/s; weight bytes per cached step {total_bytes / 1e9:.3f} GB "
          f"-> bound {total_bytes / bandwidth:.3f} s/token", file=out)

    with torch.inference_mode():
        per_step = {batch: cached_decode_profile(model, clock, stage_bytes, total_bytes, bandwidth, batch, steps, plan, out)
                    for batch in (1, 8)}[1]

    with torch.inference_mode():
        for length in (plan.prompt, 2 * plan.prompt - 1):
            prefix = random_ids(1, length, int(source.config.vocab_size), plan.device, seed=2)
            recompute_step(model, prefix[:, :16])
            clock.reset()
            synchronize(plan.device)
            start = time.perf_counter()
            recompute_step(model, prefix)
            synchronize(plan.device)
            seconds = time.perf_counter() - start
            flops = 2 * (total_bytes / source.dtype.itemsize) * length
            print(f"\n## Release recompute step, batch 1, prefix {length}: {seconds:.3f} s "
                  f"(= {seconds / per_step:.1f} cached steps; ~{flops / seconds / 1e9:.0f} GFLOP/s on the matmul weights)",
                  file=out)
            for name, stage in clock.seconds.items():
                print(f"- {name}: {stage:.3f} s ({stage / seconds:.0%})", file=out)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            recompute_step(model, prefix)
        print(f"\nTop operators, one release recompute step at prefix {prefix.shape[1]}:", file=out)
        print(op_table(prof), file=out)
    clock.remove()


def profile_train(plan, out: io.StringIO, configs: tuple[str, ...]) -> None:
    tokens = plan.train_batch * plan.train_seq
    for config in configs:
        # Diagnostic only: the cached configuration with its new output head frozen (no head gradient or
        # AdamW state; the backward still runs through the head to reach the target): what the head costs.
        frozen_head = config == "with_cache_head_frozen"
        model = train_model("with_cache" if frozen_head else config, plan)
        if frozen_head:
            model.head.requires_grad_(False)
        batch = train_inputs("with_cache" if frozen_head else config, plan, model)
        parameters = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=1e-5)
        clock = StageClock(composed_stages(model), plan.device) if config != "target_only" else None
        parts: dict[str, list[float]] = defaultdict(list)

        def step(record: bool) -> None:
            def mark(name: str, start: float) -> float:
                synchronize(plan.device)
                now = time.perf_counter()
                if record:
                    parts[name].append(now - start)
                return now

            start = time.perf_counter()
            with autocast(plan):
                loss = model(**batch).loss
            start = mark("forward (incl. loss)", start)
            loss.backward()
            start = mark("backward", start)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            mark("optimizer (AdamW foreach) + zero_grad", start)

        step(False)  # warm-up (optimizer state allocated)
        if clock:
            clock.reset()
        for _ in range(plan.train_steps):
            step(True)
        total = sum(statistics.median(v) for v in parts.values())
        trainable, flops = train_flops(model, tokens)
        trainable_bytes = sum(p.numel() * p.element_size() for p in parameters)
        frozen_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
        vocab = int(model.config.vocab_size)
        print(f"\n## Training step, {config}: batch {plan.train_batch} x {plan.train_seq}, "
              f"median {total:.3f} s/step, {flops / 1e12:.2f} TFLOP/step -> {flops / total / 1e9:.0f} GFLOP/s", file=out)
        for name, values in parts.items():
            print(f"- {name}: {statistics.median(values):.3f} s ({statistics.median(values) / total:.0%})", file=out)
        if clock:
            print("- forward by module (hooks):", file=out)
            for name, seconds in clock.seconds.items():
                print(f"  - {name}: {seconds / plan.train_steps:.3f} s", file=out)
            clock.remove()
        head = model.get_output_embeddings()
        print(f"- parameters: trainable {trainable / 1e6:.1f} M (the output head {head.weight.numel() / 1e6:.1f} M, "
              f"vocabulary {vocab}); frozen {frozen_bytes / GIB:.2f} GiB", file=out)
        print(f"- memory by construction: trainable weights + grads + AdamW m, v = 4 x {trainable_bytes / GIB:.2f} GiB "
              f"= {4 * trainable_bytes / GIB:.2f} GiB; frozen weights {frozen_bytes / GIB:.2f} GiB; one fp32 logits "
              f"tensor [B, T, V] = {tokens * vocab * 4 / GIB:.2f} GiB", file=out)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(False)
        print(f"\nTop operators, one {config} training step:", file=out)
        print(op_table(prof, rows=12), file=out)
        del model, optimizer, batch
        torch.cuda.empty_cache() if plan.device.startswith("cuda") else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=("decode", "train"))
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--configs", nargs="+",
                        default=["with_cache", "without_cache", "target_only", "with_cache_head_frozen"])
    parser.add_argument("--output-dir", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    plan = make_plan("paper", args.device, args.dtype, quick=True, threads=args.threads)
    out = io.StringIO()
    print(f"# profile: {args.what}, paper shapes, {args.device}, {plan.dtype}, torch threads {torch.get_num_threads()}",
          file=out)
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    print(f"load average at start: {' '.join(load)}", file=out)
    with contextlib.redirect_stdout(sys.stderr):
        if args.what == "decode":
            profile_decode(plan, out)
        else:
            profile_train(plan, out, tuple(args.configs))
    print(f"load average at end: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}", file=out)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    path = args.output_dir / f"profile-{args.what}-{args.device}-{plan.dtype}.txt"
    path.write_text(out.getvalue())
    print(out.getvalue())
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
