"""``llm-modules compare`` and ``llm-modules demo``: does knowledge transfer? Every method, one harness.

1. Build the world (``factworld.world``: the source knows every answer; ``factworld.composition``: an answer
   needs the source's fact and the target's cipher) and its tokenizer.
2. Pretrain the source on every fact until it recalls them at the traces' recall point, and the target on the
   world's language (and cipher) without any of its facts (``factworld.models``); the two side by side.
3. Train and score each method per seed under one budget (``factworld.methods``); optionally again
   for each transfer fraction of the sweep (the facts stay the same, only the splits change, so the
   two pretrained models are reused). Every job runs on one thread, in worker processes
   (``factworld.pool``), so the numbers do not depend on the thread count.
4. Write ``results.json``, ``report.md`` and the plots (``report``) and print the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from .compare_config import CompareConfig, WorldSettings, config_from_mapping, demo_config, load_compare_config
from ..errors import LLMModulesError
from .factworld.composition import build_composition_world
from .factworld.export import check_export_folder, commands, export_demo, exportable_rows
from .factworld.lm import build_world_tokenizer
from .factworld.methods import Budget, MethodRun, MethodSpec, Workbench, recall_report, run_method
from .factworld.metrics import target_skill
from .factworld.models import pretrain_source, pretrain_target, save_model
from .factworld.pool import available_cores, one_thread, run_jobs
from .factworld.world import FactWorld, build_world, fact_sentence
from ..training.config import parse_overrides


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def world_from_settings(settings: WorldSettings, transfer_fraction: float | None = None) -> FactWorld:
    """The world ``settings`` describe (optionally split with another transfer fraction: the same facts)."""
    build = build_composition_world if settings.kind == "composition" else build_world
    return build(
        entities=settings.entities, relations=settings.relations,
        transfer_fraction=settings.transfer_fraction if transfer_fraction is None else transfer_fraction,
        validation_fraction=settings.validation_fraction, background_entities=settings.background_entities,
        seed=settings.seed,
    )


def _pretrain(which: str, world: FactWorld, tokenizer, settings, seed: int, progress: bool):
    """One of the two pretraining jobs: (model, TrainResult, seconds)."""
    start = time.perf_counter()
    if which == "source":
        model, run = pretrain_source(
            world, tokenizer, family=settings.family, hidden=settings.hidden, layers=settings.layers, heads=settings.heads,
            steps=settings.steps, batch_size=settings.batch_size, lr=settings.lr, repeats=settings.repeats, seed=seed,
            target_recall=settings.target_recall, eval_every=settings.eval_every, progress=progress,
        )
    else:
        model, run = pretrain_target(
            world, tokenizer, family=settings.family, hidden=settings.hidden, layers=settings.layers,
            heads=settings.heads, steps=settings.steps, batch_size=settings.batch_size, lr=settings.lr, seed=seed,
            target_skill=settings.target_skill, eval_every=settings.eval_every, progress=progress,
        )
    return model, run, time.perf_counter() - start


def workers_for(config: CompareConfig) -> int:
    return config.workers if config.workers > 0 else available_cores()


def build_bench(config: CompareConfig, progress: bool = True) -> tuple[Workbench, dict]:
    """The world and its two pretrained models; returns the bench and what pretraining measured."""
    world = world_from_settings(config.world)
    log(f"world: {world.summary()}")
    tokenizer = build_world_tokenizer(world)
    workers = workers_for(config)
    seed = config.world.seed
    jobs = [("source", world, tokenizer, config.source, seed, progress and workers <= 1),
            ("target", world, tokenizer, config.target, seed, progress and workers <= 1)]
    (source, source_run, source_seconds), (target, target_run, target_seconds) = run_jobs(_pretrain, jobs, workers)
    bench = Workbench(world, tokenizer, source, target)
    with one_thread():
        recall = recall_report(bench)
        skill = target_skill(target, tokenizer, world)
    log(f"source pretrained in {source_seconds:.0f}s ({source_run.steps_run} steps): recall at the trace's recall point "
        f"{recall['test_trace']:.0%} of test facts, in its own format {recall['test_own']:.0%}")
    if recall["test_trace"] < config.source.target_recall:
        log(f"WARNING: the source recalls only {recall['test_trace']:.0%} of test facts at the recall point (target "
            f"{config.source.target_recall:.0%}); no method can transfer what it does not know. Train it longer or "
            "wider (source.steps, source.hidden) before reading the table.")
    t = config.target
    log(f"target ({t.family}) pretrained in {target_seconds:.0f}s ({target_run.steps_run} steps of {t.batch_size} "
        f"traces and sentences about {len({f.entity for f in world.background})} other entities, values drawn afresh "
        f"each time, none of the world's facts): given a recalled fact it answers {skill:.0%} of the skill probe")
    if t.target_skill is not None and skill < t.target_skill:
        log(f"WARNING: the target answers only {skill:.0%} of the skill probe given the fact (target "
            f"{t.target_skill:.0%}); no composition can use a skill it lacks. Train it longer (target.steps).")
    pretraining = {
        "source": {"seconds": source_seconds, "steps": source_run.steps_run, "recall": recall,
                   "family": config.source.family,
                   "params": sum(p.numel() for p in source.parameters()), "loss_curve": source_run.losses[::10]},
        "target": {"seconds": target_seconds, "steps": target_run.steps_run, "family": t.family, "skill": skill,
                   "params": sum(p.numel() for p in target.parameters()), "loss_curve": target_run.losses[::10]},
    }
    return bench, pretraining


def _run_job(spec: MethodSpec, bench: Workbench, budget: Budget, seed: int, progress: bool) -> MethodRun:
    run = run_method(spec, bench, budget, seed, progress=progress)
    run.model = None  # models stay in their worker (the report reads run.inspection); transformers' hooks do not pickle
    return run


def _summary(run: MethodRun) -> str:
    s = run.scores
    return (f"{run.spec.name} seed {run.seed}: test {s.accuracy:.0%} (seen {s.accuracy_seen:.0%}, unseen "
            f"{s.accuracy_unseen:.0%}), teacher-forced {s.teacher_forced:.0%}, leak probe {s.leak_probe:.0%} (largest "
            f"log p change {s.leak_shift:.2g}), format {s.format_adherence:.0%}, {run.seconds:.0f}s")


def run_all(config: CompareConfig, bench: Workbench, progress: bool = True) -> tuple[list[MethodRun], dict]:
    """Every method on every seed, then the sweep: (the main runs, {fraction: {method: [test accuracy per seed]}}).

    All jobs share one pool of workers. At the main transfer fraction (the same world) the sweep reuses the main runs.
    """
    names = set(config.sweep_methods) or {m.name for m in config.methods}
    unknown = names - {m.name for m in config.methods}
    if unknown:
        raise LLMModulesError(f"sweep_methods {sorted(unknown)} are not among the configured methods")
    workers = workers_for(config)
    inline = progress and workers <= 1
    jobs = [(spec, bench, config.budget, seed, inline) for seed in config.seeds for spec in config.methods]
    main = len(jobs)
    sweep_jobs: list[tuple[str, str]] = []  # (fraction, method name) of each sweep job
    for fraction in config.sweep_fractions:
        if fraction == config.world.transfer_fraction:
            continue
        world = world_from_settings(config.world, fraction)
        log(f"sweep: transfer fraction {fraction:.0%}: {world.summary()}")
        for spec in config.methods:
            if spec.name in names:
                for seed in config.seeds:
                    jobs.append((spec, replace(bench, world=world, _states={}), config.budget, seed, inline))
                    sweep_jobs.append((f"{fraction:g}", spec.name))
    done = 0

    def report(index: int, run: MethodRun) -> None:
        nonlocal done
        done += 1
        where = "" if index < main else f" (sweep, transfer {sweep_jobs[index - main][0]})"
        log(f"[{done}/{len(jobs)}] {_summary(run)}{where}")

    log(f"{len(jobs)} jobs on {min(workers, len(jobs))} worker(s), one thread each")
    runs = run_jobs(_run_job, jobs, workers, on_done=report)
    sweep: dict[str, dict[str, list[float]]] = {}
    for fraction in config.sweep_fractions:
        key = f"{fraction:g}"
        if fraction == config.world.transfer_fraction:
            chosen = [r for r in runs[:main] if r.spec.name in names]
        else:
            chosen = [r for (f, _), r in zip(sweep_jobs, runs[main:]) if f == key]
        results: dict[str, list[float]] = {}
        for spec in config.methods:
            for run in (r for r in chosen if r.spec.name == spec.name):
                results.setdefault(spec.name, []).append(run.scores.accuracy)
                results.setdefault(f"{spec.name}/unseen", []).append(run.scores.accuracy_unseen)
        sweep[key] = results
    return runs[:main], sweep


def compare(config: CompareConfig, progress: bool = True) -> dict:
    """Run the whole comparison; write the report into ``config.output``; return results.json's content."""
    return run_comparison(config, progress)[0]


def run_comparison(config: CompareConfig, progress: bool = True) -> tuple[dict, Workbench]:
    """``compare``, also returning the bench it built (the world and the two pretrained models)."""
    from .report import build_results, write_report

    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    bench, pretraining = build_bench(config, progress)
    save_model(bench.source, bench.tokenizer, output / "models" / "source", [fact_sentence(bench.world.facts[0])])
    save_model(bench.target, bench.tokenizer, output / "models" / "target", [fact_sentence(bench.world.background[0])])
    runs, sweep = run_all(config, bench, progress)
    results = build_results(config, bench, pretraining, runs, sweep, time.perf_counter() - start)
    with one_thread():
        write_report(results, runs, bench, output)
    return results, bench


def _parse(argv: list[str], prog: str, default_output: str, demo: bool = False
           ) -> tuple[CompareConfig, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog=prog, description="Every transfer method on the fact world, one report.")
    parser.add_argument("--config", help="compare.yaml (see examples/compare.yaml)")
    parser.add_argument("--output", help=f"folder for report.md, results.json and plots (default {default_output})")
    parser.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    if demo:
        parser.add_argument("--export", metavar="DIR", help="also write the parents, the data and the best row as "
                            "an `llm-modules train` config (DIR/train.yaml) into DIR, a new or empty folder")
        parser.add_argument("--export-method", metavar="NAME",
                            help="the row to export (default: the best composed row)")
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
    return config, args


def _print_summary(results: dict, output: Path, seconds: float) -> None:
    from .report import markdown_table

    print(markdown_table(results))
    print(f"\nchance {results['chance']:.1%}. Report, plots and results.json in {output}/ ({seconds / 60:.1f} min)")


def compare_main(argv: list[str]) -> int:
    if _is_real_table(argv):
        from .real.table import real_main

        return real_main(argv)
    config, args = _parse(argv, "llm-modules compare", "runs/compare")
    start = time.perf_counter()
    results = compare(config, not args.quiet)
    _print_summary(results, Path(config.output), time.perf_counter() - start)
    return 0


def _is_real_table(argv: list[str]) -> bool:
    """Does ``--config FILE`` name a real-table config (``real: true``, evaluation/real/)?"""
    for i, arg in enumerate(argv):
        path = argv[i + 1] if arg == "--config" and i + 1 < len(argv) else arg.split("=", 1)[1] if arg.startswith("--config=") else None
        if path and Path(path).is_file():
            from ..training.config import read_yaml_mapping

            return bool(read_yaml_mapping(path).get("real"))
    return False


def demo_main(argv: list[str]) -> int:
    """The README's main job: the comparison on a smaller world, sized for 2 CPU cores in < 10 minutes."""
    config, args = _parse(argv, "llm-modules demo", "runs/demo", demo=True)
    export = Path(args.export) if args.export else None
    if args.export_method and export is None:
        raise LLMModulesError("--export-method names the row to export; give --export DIR too")
    if export is not None:  # checked before minutes of pretraining
        check_export_folder(export)
        exportable_rows(config.methods, args.export_method)
    if config.note:
        log(config.note)
    start = time.perf_counter()
    results, bench = run_comparison(config, not args.quiet)
    _print_summary(results, Path(config.output), time.perf_counter() - start)
    if export is not None:
        train_yaml = export_demo(bench, config.methods, config.budget, config.seeds, results, export,
                                 args.export_method)
        print(f"\nexported the parents, the data and {train_yaml.name} (the row) to {export}/; train and score it "
              "with\n  " + "\n  ".join(commands(train_yaml.parent)))
    return 0


def dump_results(results: dict, path: Path) -> None:
    path.write_text(json.dumps(results, indent=2))
