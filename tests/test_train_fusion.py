"""Training the fusion topology with Trainer: two tokenizers, both memories, the source-state cache, LoRA."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from llm_modules import LLMModulesError, LLMModulesForCausalLM
from llm_modules.tiny import build_tokenizer, save_tiny, tiny_model
from llm_modules.training.config import TrainConfig
from llm_modules.training.trainer import train


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tokenizer):
    """A qwen2 source with the suite's tokenizer and a llama target with another one (it splits words differently)."""
    other = build_tokenizer(vocab_size=300)
    root = tmp_path_factory.mktemp("pair")
    source = save_tiny(tiny_model("qwen2", tokenizer, hidden=48), tokenizer, root / "source")
    target = save_tiny(tiny_model("llama", other, seed=1), other, root / "target")
    data = root / "gsm.jsonl"
    with data.open("w") as handle:
        for i in range(16):
            handle.write(json.dumps({"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}. #### {2 * i}"}) + "\n")
    return str(source), str(target), str(data)


@pytest.fixture
def config(pair, tmp_path):
    source, target, data = pair

    def make(**changes) -> TrainConfig:
        values = dict(source=source, target=target, data=data, output=str(tmp_path / "run"), topology="fusion",
                      memory="sequence", fusion_every=1, adapter_dim=16, max_steps=4, batch_size=4, validation=0.25,
                      eval_steps=2, logging_steps=1, report_to=["none"], progress=False, save_steps=2, seed=3,
                      lr_connector=1e-2)
        values.update(changes)
        return TrainConfig(**values)

    return make


def losses(result) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in result.log_history if "loss" in e}


@pytest.mark.parametrize("memory", ["sequence", "prompt"])
def test_fusion_trains_the_blocks_only_and_the_cache_gives_the_same_curve(config, tmp_path, memory):
    plain = train(config(output=str(tmp_path / "plain"), memory=memory))
    cached = train(config(output=str(tmp_path / "cached"), memory=memory, cache=str(tmp_path / "cache"),
                          cache_dtype="float32"))
    assert cached.model.source is None and plain.model.source is not None
    assert len(losses(plain)) == 4 and losses(plain)[4] < losses(plain)[1]
    for step, value in losses(plain).items():
        assert losses(cached)[step] == pytest.approx(value, abs=1e-5)
    assert cached.metrics["eval_loss"] == pytest.approx(plain.metrics["eval_loss"], abs=1e-5)
    saved = load_file(tmp_path / "plain" / "model.safetensors")
    assert saved and all(name.startswith("fusion.") for name in saved)
    results = json.loads((tmp_path / "cached" / "train_results.json").read_text())
    assert results["cache"]["computed"] == 16 and results["trainable_parameters"]["target"] == 0
    # the model trained from the cache names its source and target, reloads with both and generates
    model = LLMModulesForCausalLM.from_pretrained(tmp_path / "cached")
    assert model.source is not None and not model.config.shared_tokenizer
    inputs = model.processor(["What is 3 + 3?"])
    assert model.generate(**inputs, max_new_tokens=3, do_sample=False).shape[1] == inputs.input_ids.shape[1] + 3
    with torch.no_grad():  # the cached run trained the same weights as the plain one
        torch.testing.assert_close(model(**inputs).logits, plain.model.eval()(**inputs).logits, rtol=0, atol=1e-4)


def test_a_cache_for_another_memory_is_refused(config, tmp_path):
    train(config(max_steps=1, cache=str(tmp_path / "cache")))
    with pytest.raises(LLMModulesError, match="layout"):
        train(config(max_steps=1, cache=str(tmp_path / "cache"), memory="prompt"))


def test_lora_adapters_train_inside_the_target(config, tmp_path):
    result = train(config(train_target="lora", lora_rank=4, lora_target_modules=["q_proj", "v_proj"], lr_target=1e-2))
    saved = load_file(tmp_path / "run" / "model.safetensors")
    target_keys = [k for k in saved if k.startswith("target.")]
    assert target_keys and all("lora_" in k for k in target_keys)
    assert result.model.trainable_parameter_groups()["target"]
    reloaded = LLMModulesForCausalLM.from_pretrained(tmp_path / "run")
    inputs = reloaded.processor(["What is 3 + 3?"])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, result.model.eval()(**inputs).logits, rtol=0, atol=1e-5)


def test_prompt_memory_needs_a_prompt(config):
    with pytest.raises(LLMModulesError, match="memory='prompt' needs a prompt"):
        train(config(memory="prompt", loss_on="all", max_steps=1))
