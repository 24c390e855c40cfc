"""Slow: SemAlign on the real pair (Qwen2.5-Coder-1.5B-Instruct -> 0.5B-Instruct) on a small ARC subset.

examples/semalign-arc.yaml's recipe on 32 transfer rows for 4 steps (the table with every baseline is
benchmarks/semalign_arc.py): the plan pairs 28 -> 24 layers by the paper's depth map, the map M is
cached and reused, the source's taps come through the cache, the saved target reloads with plain
transformers with the same logits, and it answers held-out ARC-Challenge questions.
Run: LLM_MODULES_REAL_MODELS=/work/cache/real-models LLM_MODULES_DATASETS=/work/cache/datasets \
     python -m pytest -m slow -s tests/test_semalign_real.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from realpaths import QWEN_05B, REAL, REPO, needs_models

from llm_modules.evaluation.multiple_choice import chat_row, letter_accuracy, read_rows
from llm_modules.training.config import config_from_mapping, load_config
from llm_modules.training.semalign import depth_map, interpolation
from llm_modules.training.semalign.train import train_semalign

DATASETS = Path(os.environ.get("LLM_MODULES_DATASETS", Path.home() / ".cache" / "offline-datasets"))
SOURCE, TARGET = REAL / "qwen2.5-coder-1.5b-instruct", QWEN_05B
ARC = DATASETS / "arc_challenge"

pytestmark = [
    pytest.mark.slow,
    needs_models(SOURCE, TARGET),
    pytest.mark.skipif(not (ARC / "train.jsonl").is_file(), reason=f"no ARC in {DATASETS} (tools/offline-datasets.py)"),
]


def test_semalign_paper_recipe_on_the_real_pair(tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(chat_row(r)) + "\n" for r in read_rows(ARC / "train.jsonl")[:32]))
    test = read_rows(ARC / "test.jsonl")[:20]
    example = load_config(REPO / "examples" / "semalign-arc.yaml")
    config = config_from_mapping({
        "source": str(SOURCE), "target": str(TARGET), "data": str(data), "output": str(tmp_path / "run"),
        "limit": 32, "max_steps": 4, "cache": str(tmp_path / "cache"), "progress": False,
        "semalign": {**example.semalign, "map_cache": str(tmp_path / "maps"), "attribution_rows": 8},
    }, example)
    result = train_semalign(config)
    results = json.loads((tmp_path / "run" / "train_results.json").read_text())
    plan = results["plan"]
    assert (plan["source_layers"], plan["target_layers"]) == (28, 24) and len(plan["pairs"]) == 2
    for pair in plan["pairs"]:
        a, b, weight = interpolation(pair["target"], 28, 24)
        assert (pair["source_a"], pair["source_b"], pair["weight"]) == (a, b, pytest.approx(weight))
        assert depth_map(pair["target"], 28, 24) >= pair["critical"]
    assert plan["semantic_map"]["shape"] == [896, 1536] and plan["semantic_map"]["aligned_tokens"] == 151665
    assert results["cache"]["computed"] == 32 and results["steps"] == 4 and results["saved_as"] == "model"
    losses = [e["loss"] for e in result.log_history if "loss" in e]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "run")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run", dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer("Which gas do plants take in?").input_ids])
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, result.model.eval()(input_ids=ids).logits, atol=1e-4)
    scores = letter_accuracy(reloaded, tokenizer, test)
    assert scores["n"] == 20 and 0.0 <= scores["accuracy"] <= 1.0
    with capsys.disabled():
        print(f"\npairs {plan['pairs']}; losses {[round(x, 4) for x in losses]}; step {results['step_time_s']}; "
              f"20 held-out ARC-Challenge questions: {scores['accuracy']:.0%}")

    # a second run (another seed, the same critical layers) reads M from disk and the taps from the cache:
    # the source is never loaded
    critical = [pair["critical"] for pair in plan["pairs"]]
    again = config_from_mapping({"output": str(tmp_path / "again"), "max_steps": 1, "seed": 1,
                                 "semalign": {**config.semalign, "critical_layers": critical}}, config)
    train_semalign(again)
    second = json.loads((tmp_path / "again" / "train_results.json").read_text())
    assert second["plan"]["semantic_map"]["from_disk"] and second["cache"]["computed"] == 0
    assert second["source_loaded"] is False and second["plan"]["pairs"] == plan["pairs"]
