"""SemAlign on the real pair (Qwen2.5-Coder-1.5B-Instruct -> 0.5B-Instruct), held-out ARC-Challenge questions.

Rows of the table, all on one harness (``train_semalign`` on transformers' Trainer, the same data,
steps, batch and seed for every trained row; letter accuracy from the next-token logits):

    target_alone   the 0.5B as it is              source_alone   the 1.5B as it is
    sft            every target weight, cross-entropy on the letter
    lora_sft       LoRA r16 on up/down/v/o (SemAlign's adapter), cross-entropy
    kd             every target weight, Hinton KD (T=2, alpha 0.5) from the source's output
    semalign       the paper's recipe (examples/semalign-arc.yaml): LoRA r16, v1 objective
    semalign_ce    the same layer loss with cross-entropy as the output loss (what the layer term adds to lora_sft)

Usage (one at a time on a shared machine: ``flock /work/heavy.lock``):

    python benchmarks/semalign_arc.py --prepare-only
    python benchmarks/semalign_arc.py --seeds 0,1,2 --out runs/semalign-arc-table

Transfer rows: ARC-Easy + ARC-Challenge train, shuffled (seed 0); held out: the first ``--test-rows``
ARC-Challenge test questions. Writes ``results.json`` and ``table.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from llm_modules.evaluation.multiple_choice import chat_row, letter_accuracy, read_rows  # noqa: E402
from llm_modules.training.config import config_from_mapping, load_config  # noqa: E402
from llm_modules.training.semalign.train import train_semalign  # noqa: E402

METHODS = {
    "sft": {"mode": "full", "layer_loss": "none", "output_loss": "ce"},
    "lora_sft": {"mode": "lora", "layer_loss": "none", "output_loss": "ce"},
    "kd": {"mode": "full", "layer_loss": "none", "output_loss": "kd"},
    "semalign": {},
    "semalign_ce": {"output_loss": "ce"},
}
# Full fine-tuning moves every weight: the paper's LoRA lr (3e-4) would wreck a 0.5B model in a few steps.
FULL_LR = 1e-5


def prepare(datasets: Path, folder: Path, train_rows: int, test_rows: int) -> tuple[Path, list[dict]]:
    folder.mkdir(parents=True, exist_ok=True)
    train = read_rows(datasets / "arc_easy" / "train.jsonl") + read_rows(datasets / "arc_challenge" / "train.jsonl")
    random.Random(0).shuffle(train)
    test = read_rows(datasets / "arc_challenge" / "test.jsonl")[:test_rows]
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(chat_row(r)) + "\n" for r in train[:train_rows]))
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test))
    return path, test


def evaluate(folder: str | Path, test: list[dict], dtype=torch.float32) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    result = letter_accuracy(model, tokenizer, test)
    del model
    gc.collect()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=str(Path.home() / ".cache" / "real-models"))
    parser.add_argument("--datasets", default=str(Path.home() / ".cache" / "offline-datasets"))
    parser.add_argument("--data-folder", default=str(Path.home() / ".cache" / "llm-modules" / "arc"))
    parser.add_argument("--out", default="runs/semalign-arc-table")
    parser.add_argument("--config", default=str(REPO / "examples" / "semalign-arc.yaml"))
    parser.add_argument("--train-rows", type=int, default=128)
    parser.add_argument("--test-rows", type=int, default=100)
    parser.add_argument("--steps", type=int, default=None, help="default: the config's max_steps")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--methods", default="target_alone,source_alone," + ",".join(METHODS))
    parser.add_argument("--attribution-rows", type=int, default=None, help="default: the config's")
    parser.add_argument("--prepare-only", action="store_true")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    train_path, test = prepare(Path(args.datasets), Path(args.data_folder), args.train_rows, args.test_rows)
    print(f"data: {args.train_rows} transfer rows -> {train_path}; {len(test)} held-out ARC-Challenge questions")
    if args.prepare_only:
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    models = Path(args.models)
    source, target = models / "qwen2.5-coder-1.5b-instruct", models / "qwen2.5-coder-0.5b-instruct"
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    base = load_config(args.config)
    methods = [m for m in args.methods.split(",") if m]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    critical: list[int] = next((r["critical_layers"] for r in results.get("semalign", {}).values()
                                if r.get("critical_layers")), [])  # from an earlier, interrupted invocation
    def untrained(name: str) -> None:
        runs = results.setdefault(name, {})
        if "eval" not in runs:
            started = time.perf_counter()
            folder = target if name == "target_alone" else source
            runs["eval"] = evaluate(folder, test, torch.float32 if name == "target_alone" else torch.bfloat16)
            runs["eval"]["seconds"] = round(time.perf_counter() - started, 1)
        print(f"{name}: {runs['eval']['accuracy']:.1%}", flush=True)
        results_path.write_text(json.dumps(results, indent=2))

    if "target_alone" in methods:
        untrained("target_alone")
    for seed in seeds:  # every method on seed 0 first, so that a cut-short run still has a whole row set
        for name in [m for m in methods if m in METHODS]:
            runs = results.setdefault(name, {})
            if str(seed) in runs:
                continue
            semalign = {**base.semalign, **METHODS[name]}
            if args.attribution_rows:
                semalign["attribution_rows"] = args.attribution_rows
            if critical and "layer_loss" not in METHODS[name]:
                semalign["critical_layers"] = critical  # the attribution is the same rows for every seed
            overrides = {
                "source": str(source), "target": str(target), "data": str(train_path), "seed": seed,
                "output": str(out / "work" / f"{name}-{seed}"), "cache": str(out / "source-cache"),
                "semalign": semalign, "progress": False, "limit": args.train_rows,
            }
            if args.steps:
                overrides["max_steps"] = args.steps
            if semalign.get("mode") == "full":
                overrides["lr_target"] = FULL_LR
            config = config_from_mapping(overrides, base)
            started = time.perf_counter()
            result = train_semalign(config)
            if not critical and result.plan.pairs:
                critical = [p.critical for p in result.plan.pairs]
            train_seconds = time.perf_counter() - started
            del result
            gc.collect()
            scores = evaluate(config.output, test)
            train_results = json.loads((Path(config.output) / "train_results.json").read_text())
            runs[str(seed)] = {"eval": scores, "train_seconds": round(train_seconds, 1), "lr": config.lr_target,
                               "steps": train_results["steps"], "trainable": train_results["trainable_parameters"],
                               "plan": train_results["plan"]["pairs"], "train_loss": train_results["metrics"].get("train_loss"),
                               "critical_layers": [p["critical"] for p in train_results["plan"]["pairs"]]}
            print(f"{name} seed {seed}: {scores['accuracy']:.1%} ({train_seconds:.0f}s training)", flush=True)
            for weights in Path(config.output).glob("*.safetensors"):
                weights.unlink()  # 2 GB per run; the numbers are in results.json
            for checkpoint in Path(config.output).glob("checkpoint-*"):
                shutil.rmtree(checkpoint)
            results_path.write_text(json.dumps(results, indent=2))
    if "source_alone" in methods:  # last: the 1.5B's evaluation is the slowest single step on a CPU
        untrained("source_alone")
    (out / "table.md").write_text(table(results))
    print(table(results))
    return 0


def table(results: dict) -> str:
    lines = ["| method | held-out ARC-Challenge accuracy | seeds | trainable params |", "|---|---|---|---|"]
    for name, runs in results.items():
        if "eval" in runs:
            lines.append(f"| {name} | {runs['eval']['accuracy']:.1%} | - | 0 |")
            continue
        values = [r["eval"]["accuracy"] for r in runs.values()]
        if not values:
            continue
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        trainable = next(iter(runs.values()))["trainable"]
        lines.append(f"| {name} | {statistics.mean(values):.1%} ± {spread:.1%} | {len(values)} | {trainable:,} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
