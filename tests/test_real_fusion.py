"""Slow: fusion across two real tokenizers (Qwen2.5-Coder source, SmolLM2 target), and the real pair end to end.

1. The causal law with the real tokenizers and SmolLM2's chat template: random models of the two
   vocabularies, so the test needs the tokenizer files only (seconds).
2. examples/fusion-gsm8k-real.yaml: Qwen2.5-Coder-0.5B-Instruct read by SmolLM2-135M-Instruct,
   30 steps with the source-state cache through `llm-modules train --topology fusion`, then generate and eval.
Run with `python -m pytest -m slow -s tests/test_real_fusion.py` (-s shows the numbers).
"""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from realpaths import GSM8K, QWEN_05B, REPO, SMOLLM2, needs_gsm8k, needs_models
from transformers import AutoTokenizer

from llm_modules import LLMModulesForCausalLM
from llm_modules.cli import main
from llm_modules.tiny import save_tiny, tiny_model

SOURCE, TARGET = QWEN_05B, SMOLLM2
pytestmark = [pytest.mark.slow, needs_models(SOURCE, TARGET)]

CONVERSATION = [
    {"role": "user", "content": "Natalia sold clips to 48 of her friends in April, and then she sold half as many "
                                "clips in May. How many clips did Natalia sell altogether in April and May?"},
    {"role": "assistant", "content": "In May she sold 48 / 2 = 24 clips. Altogether: 48 + 24 = 72. #### 72"},
]


@pytest.fixture(scope="module")
def real_tokenizer_pair(tmp_path_factory):
    """Random tiny models that read with the real tokenizers: source Qwen2.5-Coder, target SmolLM2."""
    source_tok, target_tok = AutoTokenizer.from_pretrained(SOURCE), AutoTokenizer.from_pretrained(TARGET)
    root = tmp_path_factory.mktemp("real-tokenizers")
    source = save_tiny(tiny_model("qwen2", source_tok, hidden=48), source_tok, root / "source")
    target = save_tiny(tiny_model("llama", target_tok, seed=1), target_tok, root / "target")
    return str(source), str(target)


def _compose(pair, memory):
    torch.manual_seed(0)
    model = LLMModulesForCausalLM.compose(*pair, topology="fusion", memory=memory, fusion_every=1, adapter_dim=16,
                                          attention_dropout=0.0).eval()
    with torch.no_grad():
        for block in model.fusion.blocks:
            block.gate_alpha.fill_(1.0)
    return model


def test_causality_across_the_real_tokenizers_and_chat_template(real_tokenizer_pair):
    model = _compose(real_tokenizer_pair, "sequence")
    assert not model.config.shared_tokenizer
    text = model.tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    rng = random.Random(0)
    checked = 0
    for _ in range(10):  # cuts anywhere in the rendered conversation, inside words and markers too
        cut = rng.randrange(20, len(text) - 10)
        other = text[:cut] + "".join(rng.choice("abcxyz 0123.,") for _ in range(30))
        a, b = model.processor([text]), model.processor([other])
        ids_a, ids_b = a.input_ids[0].tolist(), b.input_ids[0].tolist()
        ends = model.processor.target_ends(text, ids_a)
        past = 0
        while past < min(len(ids_a), len(ids_b)) and ids_a[past] == ids_b[past] and ends[past] <= cut:
            past += 1
        with torch.no_grad():
            torch.testing.assert_close(model(**a).logits[0, :past], model(**b).logits[0, :past], rtol=0, atol=1e-5)
        checked += past
    assert checked > 100


@pytest.mark.parametrize("memory", ["prompt", "sequence"])
def test_cached_generation_equals_recomputation_with_real_tokenizers(real_tokenizer_pair, memory):
    model = _compose(real_tokenizer_pair, memory)
    prompt = model.tokenizer.apply_chat_template(CONVERSATION[:1], tokenize=False, add_generation_prompt=True)
    inputs = model.processor([prompt, "What is 12 + 30?"])
    settings = dict(max_new_tokens=12, do_sample=False, output_scores=True, return_dict_in_generate=True)
    cached = model.generate(**inputs, **settings)
    recomputed = model.generate(**inputs, use_cache=False, **settings)
    assert torch.equal(cached.sequences, recomputed.sequences)
    torch.testing.assert_close(torch.stack(cached.scores), torch.stack(recomputed.scores), rtol=0, atol=1e-4)


@needs_gsm8k()
def test_real_pair_fusion_trains_with_the_cache_then_generates_and_evaluates(tmp_path, capsys):
    output = tmp_path / "run"
    code = main(["train", "--config", str(REPO / "examples" / "fusion-gsm8k-real.yaml"), "--source", str(SOURCE),
                 "--target", str(TARGET), "--data", str(GSM8K / "train.jsonl"), "--output", str(output),
                 "--report-to", "none", "--progress", "false"])
    assert code == 0
    results = json.loads((output / "train_results.json").read_text())
    assert results["steps"] == 30 and results["cache"]["computed"] == 200 and results["source_loaded"] is False
    assert results["trainable_parameters"]["target"] == 0
    losses = [e["loss"] for e in json.loads((output / "trainer_state.json").read_text())["log_history"] if "loss" in e] \
        if (output / "trainer_state.json").exists() else []
    model = LLMModulesForCausalLM.from_pretrained(output)
    assert not model.config.shared_tokenizer and model.config.memory == "prompt"
    prompt = model.tokenizer.apply_chat_template(CONVERSATION[:1], tokenize=False, add_generation_prompt=True)
    inputs = model.processor([prompt])
    generated = model.generate(**inputs, max_new_tokens=32, do_sample=False)
    text = model.tokenizer.decode(generated[0, inputs.input_ids.shape[1]:], skip_special_tokens=True)
    assert main(["eval", str(output), "--data", str(GSM8K / "test.jsonl"), "--limit", "20", "--max-new-tokens",
                 "128", "--output", str(tmp_path / "eval.json")]) == 0
    evaluation = json.loads((tmp_path / "eval.json").read_text())
    assert math.isfinite(evaluation["answer_loss"]) and evaluation["exact_match_rows"] > 0
    with capsys.disabled():
        print(f"\nfusion real pair: {results['metrics']}; step time {results['step_time_s']}; cache {results['cache']}")
        print(f"losses {losses}")
        print(f"generation: {text!r}")
        print(f"eval: answer loss {evaluation['answer_loss']:.3f}, exact match {evaluation['exact_match']:.3f} "
              f"on {evaluation['exact_match_rows']}")
