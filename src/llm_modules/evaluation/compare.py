"""``llm-modules compare`` and ``llm-modules demo``: does knowledge transfer? Every method, one harness.

1. Build the fact world (``factworld.world``) and its tokenizer.
2. Pretrain the source on every fact until it recalls them at the traces' answer point, and the
   target on the world's language without any of its facts (``factworld.models``).
3. Train and score each method per seed under one budget (``factworld.methods``); optionally again
   for each transfer fraction of the sweep (the facts stay the same, only the splits change, so the
   two pretrained models are reused).
4. Write ``results.json``, ``report.md`` and the plots (``report``) and print the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch

from .compare_config import CompareConfig, config_from_mapping, demo_config, load_compare_config
from ..errors import LLMModulesError
from .factworld.lm import build_world_tokenizer
from .factworld.methods import MethodRun, Workbench, recall_report, run_method
from .factworld.models import pretrain_source, pretrain_target, save_model
from .factworld.world import FactWorld, build_world, fact_sentence
from ..training.config import parse_overrides


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def build_bench(config: CompareConfig, progress: bool = True) -> tuple[Workbench, dict]:
    """The world and its two pretrained models; returns the bench and what pretraining measured."""
    world_settings = config.world
    world = build_world(
        entities=world_settings.entities, relations=world_settings.relations,
        transfer_fraction=world_settings.transfer_fraction, validation_fraction=world_settings.validation_fraction,
        background_entities=world_settings.background_entities, seed=world_settings.seed,
    )
    log(f"world: {world.summary()}")
    tokenizer = build_world_tokenizer(world)
    s, t = config.source, config.target
    start = time.perf_counter()
    source, source_run = pretrain_source(
        world, tokenizer, hidden=s.hidden, layers=s.layers, heads=s.heads, steps=s.steps, batch_size=s.batch_size,
        lr=s.lr, repeats=s.repeats, seed=world_settings.seed, target_recall=s.target_recall,
        eval_every=s.eval_every, progress=progress,
    )
    source_seconds = time.perf_counter() - start
    start = time.perf_counter()
    target, target_run = pretrain_target(
        world, tokenizer, hidden=t.hidden, layers=t.layers, heads=t.heads, steps=t.steps, batch_size=t.batch_size,
        lr=t.lr, seed=world_settings.seed, progress=progress,
    )
    target_seconds = time.perf_counter() - start
    bench = Workbench(world, tokenizer, source, target)
    recall = recall_report(bench)
    log(f"source pretrained in {source_seconds:.0f}s ({source_run.steps_run} steps): recall at the trace answer point "
        f"{recall['test_trace']:.0%} of test facts, in its own format {recall['test_own']:.0%}")
    if recall["test_trace"] < config.source.target_recall:
        log(f"WARNING: the source recalls only {recall['test_trace']:.0%} of test facts at the answer point (target "
            f"{config.source.target_recall:.0%}); no method can transfer what it does not know. Train it longer or "
            "wider (source.steps, source.hidden) before reading the table.")
    log(f"target pretrained in {target_seconds:.0f}s on {t.steps * t.batch_size} traces and sentences about "
        f"{len({f.entity for f in world.background})} other entities, values drawn afresh each time (none of the world's facts)")
    pretraining = {
        "source": {"seconds": source_seconds, "steps": source_run.steps_run, "recall": recall,
                   "params": sum(p.numel() for p in source.parameters()), "loss_curve": source_run.losses[::10]},
        "target": {"seconds": target_seconds, "steps": target_run.steps_run,
                   "params": sum(p.numel() for p in target.parameters()), "loss_curve": target_run.losses[::10]},
    }
    return bench, pretraining


def with_fraction(world: FactWorld, settings, fraction: float) -> FactWorld:
    """The same facts split again with another transfer fraction."""
    return build_world(
        entities=settings.entities, relations=settings.relations, transfer_fraction=fraction,
        validation_fraction=settings.validation_fraction, background_entities=settings.background_entities,
        seed=settings.seed,
    )


def run_all(config: CompareConfig, bench: Workbench, progress: bool = True) -> list[MethodRun]:
    runs: list[MethodRun] = []
    total = len(config.methods) * len(config.seeds)
    for seed in config.seeds:
        for spec in config.methods:
            run = run_method(spec, bench, config.budget, seed, progress=progress)
            runs.append(run)
            s = run.scores
            log(f"[{len(runs)}/{total}] {spec.name} seed {seed}: test {s.accuracy:.0%} (seen {s.accuracy_seen:.0%}, "
                f"unseen {s.accuracy_unseen:.0%}), teacher-forced {s.teacher_forced:.0%}, leak probe {s.leak_probe:.0%} "
                f"(largest log p change {s.leak_shift:.2g}), format {s.format_adherence:.0%}, {run.seconds:.0f}s")
    return runs


def run_sweep(config: CompareConfig, bench: Workbench, progress: bool = True,
              done: Sequence[MethodRun] = ()) -> dict[str, dict[str, list[float]]]:
    """{fraction: {method: [test accuracy per seed]}} for each transfer fraction of the sweep.

    ``done``: runs of the main comparison; at the main transfer fraction (the same world) they are reused.
    """
    names = set(config.sweep_methods) or {m.name for m in config.methods}
    unknown = names - {m.name for m in config.methods}
    if unknown:
        raise LLMModulesError(f"sweep_methods {sorted(unknown)} are not among the configured methods")
    sweep: dict[str, dict[str, list[float]]] = {}
    for fraction in config.sweep_fractions:
        world = with_fraction(bench.world, config.world, fraction)
        log(f"sweep: transfer fraction {fraction:.0%}: {world.summary()}")
        fraction_bench = replace(bench, world=world)
        results: dict[str, list[float]] = {}
        for spec in config.methods:
            if spec.name not in names:
                continue
            for seed in config.seeds:
                reuse = [r for r in done if r.spec.name == spec.name and r.seed == seed]
                if reuse and fraction == config.world.transfer_fraction:
                    run = reuse[0]
                else:
                    run = run_method(spec, fraction_bench, config.budget, seed, progress=progress)
                results.setdefault(spec.name, []).append(run.scores.accuracy)
                results.setdefault(f"{spec.name}/unseen", []).append(run.scores.accuracy_unseen)
            log(f"  {spec.name}: {sum(results[spec.name]) / len(results[spec.name]):.0%}")
        sweep[f"{fraction:g}"] = results
    return sweep


def compare(config: CompareConfig, progress: bool = True) -> dict:
    """Run the whole comparison; write the report into ``config.output``; return results.json's content."""
    from .report import build_results, write_report

    torch.set_num_threads(max(1, torch.get_num_threads()))
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    bench, pretraining = build_bench(config, progress)
    save_model(bench.source, bench.tokenizer, output / "models" / "source", [fact_sentence(bench.world.facts[0])])
    save_model(bench.target, bench.tokenizer, output / "models" / "target", [fact_sentence(bench.world.background[0])])
    runs = run_all(config, bench, progress)
    sweep = run_sweep(config, bench, progress, done=runs) if config.sweep_fractions else {}
    results = build_results(config, bench, pretraining, runs, sweep, time.perf_counter() - start)
    write_report(results, runs, bench, output)
    return results


def _parse(argv: list[str], prog: str, default_output: str) -> tuple[CompareConfig, bool]:
    parser = argparse.ArgumentParser(prog=prog, description="Every transfer method on the fact world, one report.")
    parser.add_argument("--config", help="compare.yaml (see examples/compare.yaml)")
    parser.add_argument("--output", help=f"folder for report.md, results.json and plots (default {default_output})")
    parser.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args, rest = parser.parse_known_args(argv)
    overrides = parse_overrides(rest)
    if args.config:
        config = load_compare_config(args.config)
    else:
        config = demo_config(default_output)
    if overrides:  # --budget.steps 100 style overrides of any field
        nested: dict = {}
        for key, value in overrides.items():
            section, _, name = key.partition(".")
            if name:
                nested.setdefault(section, {})[name] = value
            else:
                nested[section] = value
        merged = config.to_dict()
        for key, value in nested.items():
            merged[key] = {**merged[key], **value} if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
        config = config_from_mapping(merged, where="command line")
    if args.output:
        config.output = args.output
    if args.seeds:
        config.seeds = [int(s) for s in args.seeds.split(",") if s]
    return config, not args.quiet


def _print_summary(results: dict, output: Path, seconds: float) -> None:
    from .report import markdown_table

    print(markdown_table(results))
    print(f"\nchance {results['chance']:.1%}. Report, plots and results.json in {output}/ ({seconds / 60:.1f} min)")


def compare_main(argv: list[str]) -> int:
    config, progress = _parse(argv, "llm-modules compare", "runs/compare")
    start = time.perf_counter()
    results = compare(config, progress)
    _print_summary(results, Path(config.output), time.perf_counter() - start)
    return 0


def demo_main(argv: list[str]) -> int:
    """The README's main job: the comparison on a smaller world, sized for 2 CPU cores in < 10 minutes."""
    config, progress = _parse(argv, "llm-modules demo", "runs/demo")
    if config.note:
        log(config.note)
    start = time.perf_counter()
    results = compare(config, progress)
    _print_summary(results, Path(config.output), time.perf_counter() - start)
    return 0


def dump_results(results: dict, path: Path) -> None:
    path.write_text(json.dumps(results, indent=2))
