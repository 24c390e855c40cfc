"""The ``semalign`` row: SemAlign v1 (the paper's recipe) through ``llm-modules train --method semalign``.

It trains on the same transfer questions, in the same letter text (``template: raw``: the question, then the
letter as the reply), with the table's epochs, batch and schedule; LoRA r16 on up/down/v/o at 3e-4 and the
v1 objective as in ``examples/semalign-arc.yaml``. SemAlign needs one vocabulary (its semantic bases map the
source's states through both output heads), so it is a row of the one-tokenizer pair only. Its own source
pass reads the source's taps at the paired layers (its own cache in the row's work folder).
"""

from __future__ import annotations

import gc
import json
import shutil
import time
from pathlib import Path

from ...model.loading import load_causal_lm, load_tokenizer
from ...training.config import TrainConfig, config_from_mapping
from .questions import HELDOUT_TASKS, QuestionSets
from .scorers import TargetScorer, score

SEMALIGN_V1 = {"version": "v1", "mode": "lora", "lora_r": 16, "lora_alpha": 16, "pairs": 2,
               "interface": "contribution", "attribution_rows": 32, "merge": True}


def run_semalign_row(config, pair: str, seed: int, sets: QuestionSets) -> dict:
    from ...training.semalign.train import train_semalign

    target = config.pairs[pair].target
    work = Path(config.output) / "work" / f"{pair}-semalign-{seed}"
    work.mkdir(parents=True, exist_ok=True)
    data = work / "transfer.jsonl"
    data.write_text("".join(json.dumps({"prompt": q.text, "completion": " " + q.letters[q.answer]}) + "\n"
                            for q in sets.transfer))
    overrides = {
        "method": "semalign", "source": config.source, "target": target, "data": str(data),
        "output": str(work / "model"), "validation": 0, "template": "raw", "loss_on": "assistant", "append_eos": False,
        "semalign": dict(SEMALIGN_V1), "cache": str(work / "source-cache"), "cache_dtype": "bfloat16",
        "source_dtype": config.source_dtype, "epochs": config.budget.epochs, "batch_size": config.budget.batch_size,
        "lr_target": config.rates.lora, "warmup": config.budget.warmup, "scheduler": config.budget.scheduler,
        "weight_decay": config.budget.weight_decay, "max_grad_norm": config.budget.max_grad_norm, "seed": seed,
        "report_to": ["none"], "logging_steps": 10, "progress": True,
    }
    run = config_from_mapping(overrides, TrainConfig())
    result = train_semalign(run)
    del result
    gc.collect()
    report = json.loads((Path(run.output) / "train_results.json").read_text())
    model = load_causal_lm("target", run.output, dtype="float32")
    scorer = TargetScorer(load_tokenizer(run.output, "target"))
    entry = {"train_seconds": round(float(report.get("train_seconds", report.get("metrics", {}).get("train_runtime", 0.0))), 1),
             "steps": report.get("steps"), "train_loss": report.get("metrics", {}).get("train_loss"),
             "trainable_params": report.get("trainable_parameters"), "inference_params": sum(p.numel() for p in model.parameters()),
             "plan": report.get("plan", {}).get("pairs")}
    for task in HELDOUT_TASKS:
        started = time.perf_counter()
        entry[task] = score(model, scorer, sets.heldout[task], config.score_batch_size)
        entry[task]["seconds_per_question"] = round((time.perf_counter() - started) / max(1, len(sets.heldout[task])), 4)
    del model
    gc.collect()
    shutil.rmtree(work, ignore_errors=True)  # ~2 GB of merged weights and taps; the numbers are in results.json
    return entry
