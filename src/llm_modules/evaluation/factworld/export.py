"""``llm-modules demo --export DIR``: the demo's parents, data and best row as files that ``llm-modules train`` and
``llm-modules eval`` read, so that the row can be trained again outside the harness (and then on other data).

What ``DIR`` holds:

- ``source/``, ``target/``: the demo's pretrained parents, ordinary HF folders with the world's tokenizer;
- ``train.jsonl``: the transfer data the demo trained on (every question form of each transfer fact), Bespoke-Stratos
  records (``system`` + ``conversations``; ``fact`` says which fact, for the reader: training ignores it);
- ``validation.jsonl``: the demo's validation facts (its first ``budget.validation_facts``), one question each;
- ``test.jsonl``, ``test_seen.jsonl``, ``test_unseen.jsonl``: the held-out test facts as the demo scores them (the
  first question form), all of them and split by whether the final answer occurs in the transfer data;
- ``train.yaml``: the row as a run config (``ComposeOptions``, learning rates, steps, batch, seed), its comment
  header giving the commands to run;
- ``demo_row.json``: the row's scores in the demo, per seed, to compare with what ``llm-modules eval`` reports.
"""

from __future__ import annotations

import json
from pathlib import Path
from statistics import mean
from typing import Any, Iterable, Sequence

import yaml

from ...errors import LLMModulesError
from .methods import COMPOSED, HARNESS_OPTIONS, Budget, MethodSpec, Workbench, composed_options, harness_options
from .models import save_model
from .world import Fact, FactWorld, fact_sentence

EVAL_MAX_NEW_TOKENS = 40  # what the demo lets a model generate (metrics.evaluate_traces)
WARMUP_STEPS = 20  # the demo's training loop warms up over 20 steps, then decays on a cosine (lm.train_loop)


def check_export_folder(folder: Path) -> None:
    """``folder`` must not exist or be an empty folder: an export never mixes with older files."""
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        what = "is not a folder" if not folder.is_dir() else "is not empty"
        raise LLMModulesError(f"--export {folder} {what}; give a new or empty folder (the export writes models, data "
                              "and train.yaml there and never overwrites)")


def exportable(spec: MethodSpec) -> bool:
    """Can ``llm-modules train`` express the row? A composed model (bridge or fusion) whose harness-only options (a
    frozen bridge target, a head started from the target's) are at their defaults."""
    if spec.kind not in COMPOSED:
        return False
    return spec.kind == "fusion" or all(v == HARNESS_OPTIONS[k][0] for k, v in harness_options(spec).items())


def exportable_rows(methods: Sequence[MethodSpec], name: str | None = None) -> list[MethodSpec]:
    """The rows of ``methods`` an export may write (only ``name`` when given), or an error saying why there is none."""
    rows = [spec for spec in methods if exportable(spec)]
    if name is not None:
        if name not in [spec.name for spec in rows]:
            known = [spec.name for spec in methods]
            why = ("is not one of the demo's rows" if name not in known
                   else "is not a composed row llm-modules train runs")
            listed = ", ".join(spec.name for spec in rows) or "none"
            raise LLMModulesError(f"--export-method {name} {why}; exportable rows: {listed}")
        rows = [spec for spec in rows if spec.name == name]
    if not rows:
        raise LLMModulesError("the demo runs no composed (bridge or fusion) row; --export needs one to write "
                              "train.yaml")
    return rows


def choose_row(methods: Sequence[MethodSpec], results: dict, name: str | None = None) -> MethodSpec:
    """The row to export: ``name``, or the exportable row with the best mean validation accuracy in ``results``
    (never chosen on the test facts, which the exported files are scored on)."""
    return max(exportable_rows(methods, name),
               key=lambda spec: mean(results["methods"][spec.name]["validation_accuracy"]))


def train_config_values(spec: MethodSpec, budget: Budget, folder: Path, seed: int) -> dict[str, Any]:
    """The ``TrainConfig`` mapping of row ``spec`` trained as the demo trains it (``methods.run_method``): the same
    model options, learning-rate groups, steps, batch, clipping and seed, on the exported files in ``folder``."""
    return {
        "source": str(folder / "source"),
        "target": str(folder / "target"),
        "data": str(folder / "train.jsonl"),
        "validation_data": str(folder / "validation.jsonl"),
        "output": str(folder / "run"),
        "source_dtype": "float32",  # as the demo runs it, whatever the CPU computes natively
        "template": "chat",
        "loss_on": "assistant",
        "model": composed_options(spec),
        "max_steps": budget.steps,
        "batch_size": budget.batch_size,
        "lr_connector": budget.lr,
        "lr_target": budget.target_lr,
        "lr_mixture": budget.mixture_rate,
        "weight_decay": 0.0,
        "warmup": WARMUP_STEPS,
        "scheduler": "cosine",
        "max_grad_norm": 1.0,
        "seed": seed,
        "eval_steps": budget.eval_every,
        "save_steps": budget.eval_every,
        "cache": None,
        "report_to": ["none"],
    }


def commands(folder: Path) -> list[str]:
    """The commands that train the exported row and score it as the demo does."""
    return [f"llm-modules train --config {folder / 'train.yaml'}",
            f"llm-modules eval {folder / 'run'} --data {folder / 'test.jsonl'} --max-new-tokens {EVAL_MAX_NEW_TOKENS} "
            "--batch-size 16"]


def demo_row(spec: MethodSpec, seeds: Sequence[int], results: dict) -> dict[str, Any]:
    """The row's scores in the demo, per seed and their mean."""
    entry = results["methods"][spec.name]
    keys = ("test_accuracy", "test_accuracy_seen", "test_accuracy_unseen", "format_adherence", "steps", "best_step")
    return {"method": spec.name, "kind": spec.kind, "options": dict(spec.options), "seeds": list(seeds),
            **{key: entry[key] for key in keys if key in entry},
            "mean_test_accuracy": mean(entry["test_accuracy"])}


def train_yaml(values: dict[str, Any], row: dict[str, Any], folder: Path, budget: Budget) -> str:
    """``train.yaml``'s text: a comment header (the row, its demo score, the commands, what differs) and the config."""
    per_seed = ", ".join(f"seed {s}: {a:.1%}" for s, a in zip(row["seeds"], row["test_accuracy"]))
    header = [
        f"The demo's row {row['method']}",
        "as an `llm-modules train` run (written by llm-modules demo --export).",
        f"In the demo: test accuracy {row['mean_test_accuracy']:.1%} ({per_seed}); demo_row.json has the rest.",
        "Reproduce it:",
        f"  llm-modules demo --export {folder}     # done: the world, both parents and this file",
        *(f"  {command}" for command in commands(folder)),
        "`exact_match` in eval's JSON is the demo's test accuracy; test_seen.jsonl / test_unseen.jsonl give its",
        "answer seen / unseen columns.",
        "Your own data: point data (and validation_data) at your .jsonl (Bespoke-Stratos/ShareGPT, messages,",
        "prompt/completion, question/answer; see README, Training) and source/target at your models.",
        "One difference: the demo keeps the step with the best greedy accuracy on validation facts",
        f"(checked every {budget.eval_every} steps, patience {budget.patience}); this run trains all {budget.steps} "
        "steps and reports validation loss.",
    ]
    comment = "".join(f"# {line}\n" for line in header)
    return comment + yaml.safe_dump(values, sort_keys=False, default_flow_style=None)


def trace_records(world: FactWorld, facts: Iterable[Fact], forms: int = 1) -> list[dict]:
    """Bespoke-Stratos records of ``facts``' traces, ``forms`` question forms each."""
    return [world.trace_record(fact, form) for fact in facts for form in range(forms)]


def write_jsonl(path: Path, records: Sequence[dict]) -> None:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def export_demo(bench: Workbench, methods: Sequence[MethodSpec], budget: Budget, seeds: Sequence[int], results: dict,
                folder: Path, method: str | None = None) -> Path:
    """Write the demo's parents, data and row ``method`` of ``methods`` (default: the best exportable row in
    ``results``, the demo's results.json) into ``folder``; returns the path of ``train.yaml``. The run config trains
    with the first of the demo's ``seeds``, under its ``budget``."""
    check_export_folder(folder)
    spec = choose_row(methods, results, method)
    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    world = bench.world
    save_model(bench.source, bench.tokenizer, folder / "source", [fact_sentence(world.facts[0])])
    save_model(bench.target, bench.tokenizer, folder / "target", [fact_sentence(world.background[0])])
    write_jsonl(folder / "train.jsonl", trace_records(world, world.transfer, world.question_forms))
    write_jsonl(folder / "validation.jsonl", trace_records(world, world.validation[: budget.validation_facts]))
    write_jsonl(folder / "test.jsonl", trace_records(world, world.test))
    write_jsonl(folder / "test_seen.jsonl", trace_records(world, [f for f in world.test if world.answer_seen(f)]))
    write_jsonl(folder / "test_unseen.jsonl", trace_records(world, [f for f in world.test if not world.answer_seen(f)]))
    row = demo_row(spec, seeds, results)
    (folder / "demo_row.json").write_text(json.dumps(row, indent=2) + "\n")
    values = train_config_values(spec, budget, folder, seeds[0])
    path = folder / "train.yaml"
    path.write_text(train_yaml(values, row, folder, budget))
    return path


__all__ = ["check_export_folder", "choose_row", "commands", "export_demo", "exportable", "exportable_rows",
           "train_config_values"]
