"""The real transfer table: ``llm-modules compare --config examples/real-arc.yaml``.

Stages: the source pass (once, cached), then each pair's rows, each seed. Every finished (pair, row, seed) is
written to ``OUTPUT/results.json`` at once (atomically; a copy goes to ``DOCS/real-transfer-runs.json``, which is
committed) and skipped when the command runs again, so a killed or interrupted run resumes where it stopped,
on another machine too (from the committed copy; the source pass is then recomputed where its cache is gone);
``--pair`` and ``--row`` run a part of it. The report
(``OUTPUT/real-transfer.md``, ``.json`` and the accuracy-vs-cost plot) is rewritten after every row.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path


from ...errors import LLMModulesError
from ...training.atomic import atomic_write_json
from ...training.config import convert_value, read_yaml_mapping
from .letter_training import Distillation, LetterBudget, train_on_letters
from .questions import HELDOUT_TASKS, QuestionSets, question_sets
from .report import write_report
from .rows import READS_SOURCE, ROWS, UNTRAINED, RowLearningRates, build_row
from .scorers import score
from .source_pass import SourcePass, run_source_pass

RUNS_FILE = "real-transfer-runs.json"  # in ``docs``: results.json as committed (every seed, every answer)


@dataclass
class QuestionSettings:
    transfer: int = 400
    arc_challenge: int = 200
    mmlu: int = 200
    seed: int = 0


@dataclass
class PairSettings:
    target: str = ""
    rows: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])


@dataclass
class RealTableConfig:
    """``real: true`` marks a real-table config for ``llm-modules compare``."""

    real: bool = True
    source: str = ""
    datasets: str = "~/.cache/offline-datasets"
    output: str = "runs/real-arc"
    docs: str | None = None  # also write the report files here (docs/results)
    source_dtype: str | None = None  # None: float32 on a CPU without native bf16, else the checkpoint's
    questions: QuestionSettings = field(default_factory=QuestionSettings)
    budget: LetterBudget = field(default_factory=LetterBudget)
    rates: RowLearningRates = field(default_factory=RowLearningRates)
    kd_temperature: float = 2.0
    kd_alpha: float = 0.5
    score_batch_size: int = 8
    save_models: list[str] = field(default_factory=list)  # "pair/row": keep its first seed's model in OUTPUT/models
    pairs: dict[str, PairSettings] = field(default_factory=dict)
    command: str = ""

    def check(self) -> None:
        if not self.source:
            raise LLMModulesError("real table: `source` is not set (a model folder or hub id)")
        if not self.pairs:
            raise LLMModulesError("real table: `pairs` is empty; give at least one pair with a target and rows")
        for name, pair in self.pairs.items():
            if not pair.target:
                raise LLMModulesError(f"real table: pairs.{name}.target is not set")
            unknown = [r for r in pair.rows if r not in ROWS]
            if unknown:
                raise LLMModulesError(f"real table: pairs.{name}.rows has {unknown}; rows are {', '.join(ROWS)}")
            if not pair.seeds:
                raise LLMModulesError(f"real table: pairs.{name}.seeds is empty")


def _section(cls, values: dict, where: str):
    names = {f.name: f for f in fields(cls)}
    unknown = set(values) - set(names)
    if unknown:
        raise LLMModulesError(f"{where}: unknown key(s) {sorted(unknown)}; valid keys: {', '.join(names)}")
    import typing

    hints = typing.get_type_hints(cls)
    return cls(**{k: convert_value(f"{where}.{k}", v, hints[k]) for k, v in values.items()})


def load_real_config(path: str | Path, overrides: dict | None = None) -> RealTableConfig:
    values = dict(read_yaml_mapping(path))
    values.update(overrides or {})
    sections = {"questions": QuestionSettings, "budget": LetterBudget, "rates": RowLearningRates}
    kwargs = {}
    for key, value in values.items():
        if key in sections:
            kwargs[key] = _section(sections[key], value or {}, f"{path}: {key}")
        elif key == "pairs":
            if not isinstance(value, dict):
                raise LLMModulesError(f"{path}: pairs must map a pair name to its target, rows and seeds")
            kwargs[key] = {name: _section(PairSettings, pair or {}, f"{path}: pairs.{name}") for name, pair in value.items()}
        else:
            kwargs[key] = value
    config = _section(RealTableConfig, {k: v for k, v in kwargs.items() if k not in (*sections, "pairs")}, str(path))
    for key in (*sections, "pairs"):
        if key in kwargs:
            setattr(config, key, kwargs[key])
    for name in ("source", "datasets"):
        setattr(config, name, str(Path(getattr(config, name)).expanduser()) if getattr(config, name).startswith("~") else getattr(config, name))
    for pair in config.pairs.values():
        pair.target = str(Path(pair.target).expanduser()) if pair.target.startswith("~") else pair.target
    config.check()
    return config


def _source_params(source: str) -> int:
    """The source's parameter count from its safetensors headers (no weights read)."""
    from safetensors import safe_open

    total = 0
    for path in sorted(Path(source).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                shape = handle.get_slice(name).get_shape()
                count = 1
                for d in shape:
                    count *= d
                total += count
    return total


class Progress:
    """Rows done / to do, with an ETA from the mean time of the rows done in this invocation."""

    def __init__(self, todo: int) -> None:
        self.todo, self.done, self.seconds = todo, 0, 0.0

    def line(self, label: str) -> str:
        eta = ""
        if self.seconds > 1:  # untrained rows take ~0 s: no ETA from them alone
            left = (self.todo - self.done) * self.seconds / self.done
            eta = f", about {left / 60:.0f} min left"
        return f"[{self.done}/{self.todo}{eta}] {label}"

    def finish(self, seconds: float) -> None:
        self.done += 1
        self.seconds += seconds


def run_row(config: RealTableConfig, pair: str, row: str, seed: int, sets: QuestionSets, source: SourcePass,
            source_params: int) -> dict:
    """Train (unless untrained) and score one row on every held-out set; the result entry of results.json."""
    target = config.pairs[pair].target
    if row == "source_alone":
        return _source_alone(sets, source, source_params)
    if row == "semalign":
        from .semalign_row import run_semalign_row

        return run_semalign_row(config, pair, seed, sets)
    built = build_row(row, target, source, config.source, source_params, config.rates, seed)
    entry: dict = {"inference_params": built.inference_params}
    if row not in UNTRAINED:
        kd = Distillation(source.letters, config.kd_temperature, config.kd_alpha) if row == "kd" else None
        work = Path(config.output) / "work" / f"{pair}-{row}-{seed}"
        trained = train_on_letters(built.model, built.scorer, sets.transfer, built.groups, config.budget, work, seed,
                                   kd=kd)
        shutil.rmtree(work, ignore_errors=True)
        entry.update(train_seconds=round(trained.seconds, 1), steps=trained.steps, train_loss=trained.train_loss,
                     trainable_params=trained.trainable_params)
    else:
        entry.update(train_seconds=0.0, steps=0, train_loss=None, trainable_params=0)
    per_question_source = source.seconds / max(1, len(sets.all())) if row in READS_SOURCE else 0.0
    for task in HELDOUT_TASKS:
        started = time.perf_counter()
        entry[task] = score(built.model, built.scorer, sets.heldout[task], config.score_batch_size)
        seconds = time.perf_counter() - started
        entry[task]["seconds_per_question"] = round(seconds / max(1, len(sets.heldout[task])) + per_question_source, 4)
    if f"{pair}/{row}" in config.save_models and seed == config.pairs[pair].seeds[0]:
        folder = Path(config.output) / "models" / f"{pair}-{row}-{seed}"
        built.model.save_pretrained(str(folder))
        if not hasattr(built.model, "processor"):  # a plain target: its tokenizer goes with it
            built.scorer.tokenizer.save_pretrained(str(folder))
        entry["saved"] = str(folder)
    del built
    gc.collect()
    return entry


def _source_alone(sets: QuestionSets, source: SourcePass, source_params: int) -> dict:
    entry: dict = {"inference_params": source_params, "trainable_params": 0, "train_seconds": 0.0, "steps": 0}
    per_question = source.seconds / max(1, len(sets.all()))
    for task in HELDOUT_TASKS:
        questions = sets.heldout[task]
        predictions = [max(range(len(q.choices)), key=lambda i, q=q: source.letters[q.id][i]) for q in questions]
        correct = sum(int(p == q.answer) for p, q in zip(predictions, questions))
        entry[task] = {"accuracy": correct / max(1, len(questions)), "correct": correct, "n": len(questions),
                       "predictions": predictions, "ids": [q.id for q in questions],
                       "seconds_per_question": round(per_question, 4)}
    return entry


def run_table(config: RealTableConfig, only_pair: str | None = None, only_row: str | None = None) -> dict:
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    results_path = output / "results.json"
    committed = Path(config.docs) / RUNS_FILE if config.docs else None
    if results_path.exists():
        results = json.loads(results_path.read_text())
    elif committed is not None and committed.exists():  # a fresh machine resumes from the committed rows
        results = json.loads(committed.read_text())
        print(f"real table: resuming from {committed}", file=sys.stderr)
    else:
        results = {}
    sets = question_sets(config.datasets, config.questions.transfer, config.questions.arc_challenge,
                         config.questions.mmlu, config.questions.seed)
    ids = sets.ids()
    if results.get("questions") not in (None, ids):
        raise LLMModulesError(f"{results_path} was computed on other questions; use another output folder or delete it")
    results["questions"] = ids
    results["settings"] = _settings(config)
    results.setdefault("rows", {})
    pairs = [only_pair] if only_pair else list(config.pairs)
    for name in pairs:
        if name not in config.pairs:
            raise LLMModulesError(f"--pair {name!r}: this config's pairs are {', '.join(config.pairs)}")
    jobs = [(pair, row, seed) for pair in pairs for seed in config.pairs[pair].seeds for row in config.pairs[pair].rows
            if (only_row is None or row == only_row) and not (row in UNTRAINED and seed != config.pairs[pair].seeds[0])]
    todo = [j for j in jobs if str(j[2]) not in results["rows"].get(f"{j[0]}/{j[1]}", {})]
    print(f"real table: {len(jobs) - len(todo)} of {len(jobs)} rows already in {results_path}; {len(todo)} to run",
          file=sys.stderr)
    started = time.perf_counter()
    source = run_source_pass(config.source, sets.all(), output / "source-cache", config.source_dtype)
    results["source_pass"] = {"seconds": round(source.seconds, 1), "tokens": source.tokens, "dtype": source.dtype,
                              "prompts": len(sets.all()), "wall_seconds_this_run": round(time.perf_counter() - started, 1)}
    source_params = _source_params(config.source)
    progress = Progress(len(todo))
    for pair, row, seed in todo:
        print(progress.line(f"{pair} / {row} / seed {seed}"), file=sys.stderr, flush=True)
        began = time.perf_counter()
        entry = run_row(config, pair, row, seed, sets, source, source_params)
        entry["wall_seconds"] = round(time.perf_counter() - began, 1)
        results["rows"].setdefault(f"{pair}/{row}", {})[str(seed)] = entry
        _save(results, results_path, committed)
        progress.finish(entry["wall_seconds"])
        print(f"  {pair} / {row} / seed {seed}: ARC-Challenge {entry['arc_challenge']['accuracy']:.1%}, "
              f"MMLU {entry['mmlu']['accuracy']:.1%} ({entry['wall_seconds']:.0f} s)", file=sys.stderr, flush=True)
        write_report(results, config, sets)
    _save(results, results_path, committed)
    write_report(results, config, sets)
    return results


def _save(results: dict, path: Path, committed: Path | None) -> None:
    """results.json, and its copy in docs: every seed's answers, committed with the report (the next machine
    resumes from it)."""
    atomic_write_json(path, results)
    if committed is not None:
        committed.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(committed, results)


def _settings(config: RealTableConfig) -> dict:
    data = asdict(config)
    data["pairs"] = {k: asdict(v) for k, v in config.pairs.items()}
    return data


def real_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="llm-modules compare", description="the real transfer table (a config with real: true)")
    parser.add_argument("--config", required=True)
    parser.add_argument("--pair", help="run only this pair's rows")
    parser.add_argument("--row", help="run only this row (of every pair, or of --pair)")
    parser.add_argument("--output", help="results folder (default: the config's)")
    parser.add_argument("--docs", help="also write the report here (default: the config's docs)")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in (("output", args.output), ("docs", args.docs)) if v}
    config = load_real_config(args.config, overrides)
    # the command that makes one row: the config (and output folders) as given; --pair/--row are added per row
    config.command = " ".join(["llm-modules compare --config", args.config]
                              + [f"--{k} {v}" for k, v in (("output", args.output), ("docs", args.docs)) if v])
    if args.row and args.row not in ROWS:
        raise LLMModulesError(f"--row {args.row!r} is not a row; rows: {', '.join(ROWS)}")
    run_table(config, args.pair, args.row)
    return 0
