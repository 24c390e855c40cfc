"""Slow: the real pretrained pair (built by ../shared/tools/real-models.py). Run with `pytest -m slow`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from llm_modules import LLMModulesForCausalLM

REAL = Path(os.environ.get("LLM_MODULES_REAL_MODELS", Path.home() / ".cache" / "real-models"))
SOURCE, TARGET = REAL / "qwen2.5-coder-0.5b-instruct", REAL / "smollm2-135m-instruct"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (SOURCE.is_dir() and TARGET.is_dir()),
        reason=f"real models not built; run: python ../shared/tools/real-models.py --out {REAL}",
    ),
]


def test_real_pair_composes_and_cached_generation_matches_recomputation():
    model = LLMModulesForCausalLM.compose(str(SOURCE), str(TARGET), heads=9).eval()
    assert model.config.vocab_size >= len(model.tokenizer)
    inputs = model.tokenizer(["def add(a, b):", "x = 1"], return_tensors="pt", padding=True, padding_side="left")
    cached = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    recomputed = model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, recomputed)
