"""Slow: examples/gsm8k-real.yaml end to end on the real pair (Qwen2.5-Coder-0.5B -> SmolLM2-135M).

30 optimizer steps on 200 GSM8K training rows with the source-state cache, then the saved model
generates and `llm-modules eval` scores 20 test questions. About 35 minutes on 2 shared CPU cores.
Run with `python -m pytest -m slow -s tests/test_real_training.py` (-s shows the numbers).
"""

from __future__ import annotations

import gc
import json
import math
import shutil

import pytest
import torch
from realpaths import GSM8K, QWEN_05B, REPO, SMOLLM2, needs_gsm8k, needs_models

from llm_modules import LLMModulesForCausalLM
from llm_modules.cli import main
from llm_modules.training.trainer import train
from llm_modules.training.config import config_from_mapping, load_config

SOURCE, TARGET = QWEN_05B, SMOLLM2
pytestmark = [pytest.mark.slow, needs_models(SOURCE, TARGET), needs_gsm8k()]


def test_real_pair_trains_on_gsm8k_with_the_cache_then_generates_and_evaluates(tmp_path, capsys):
    output = tmp_path / "run"
    example = load_config(REPO / "examples" / "gsm8k-real.yaml")
    config = config_from_mapping({"source": str(SOURCE), "target": str(TARGET), "data": str(GSM8K / "train.jsonl"),
                                  "output": str(output), "report_to": "none", "progress": False}, example)
    assert (config.limit, config.max_steps, config.cache) == (200, 30, "auto")

    result = train(config)
    results = json.loads((output / "train_results.json").read_text())
    assert results["steps"] == 30
    assert results["data"]["used"] == 200 and results["data"]["train"] + results["data"]["validation"] == 200
    assert results["cache"]["computed"] == 200 and results["source_loaded"] is False
    losses = [entry["loss"] for entry in result.log_history if "loss" in entry]
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:3]) / 3, sum(losses[-5:]) / 5
    assert last < first - 0.5, f"training loss did not go down: first 3 steps {first:.3f}, last 5 {last:.3f}"
    assert math.isfinite(result.metrics["eval_loss"])
    with capsys.disabled():
        print(f"\nloss: first 3 steps {first:.3f}, last 5 steps {last:.3f}; per step {[round(x, 3) for x in losses]}")
        print(f"validation loss {result.metrics['eval_loss']:.3f}; step time {results['step_time_s']}; "
              f"cache {results['cache']}")
    del result
    gc.collect()
    for checkpoint in output.glob("checkpoint-*"):  # ~2 GB each (trainable weights + AdamW state)
        shutil.rmtree(checkpoint)

    # The saved result reloads with its source and generates.
    model = LLMModulesForCausalLM.from_pretrained(output)
    assert model.source is not None
    prompt = model.tokenizer.apply_chat_template([{"role": "user", "content": "What is 12 + 30?"}], tokenize=False,
                                                 add_generation_prompt=True)
    inputs = model.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    text = model.tokenizer.decode(generated[0, inputs.input_ids.shape[1]:], skip_special_tokens=True)
    assert generated.shape[1] > inputs.input_ids.shape[1] and text.strip()
    del model
    gc.collect()

    # llm-modules eval on 20 held-out questions.
    report = tmp_path / "eval.json"
    code = main(["eval", str(output), "--data", str(GSM8K / "test.jsonl"), "--limit", "20",
                 "--max-new-tokens", "128", "--batch-size", "10", "--output", str(report)])
    assert code == 0
    metrics = json.loads(report.read_text())
    assert metrics["rows"] == 20 and metrics["exact_match_rows"] == 20
    assert math.isfinite(metrics["answer_loss"]) and metrics["answer_tokens"] > 0
    assert 0.0 <= metrics["exact_match"] <= 1.0
    with capsys.disabled():
        print(f"generation for 'What is 12 + 30?': {text!r}")
        print("eval: " + json.dumps({k: metrics[k] for k in ("rows", "answer_tokens", "answer_loss", "answer_perplexity",
                                                              "exact_match", "correct", "no_answer_extracted")}))
        print("eval sample: " + json.dumps(metrics["samples"][0]))
