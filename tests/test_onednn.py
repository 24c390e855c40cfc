"""Frozen float32 linears through oneDNN (model/onednn.py): the same model, decoded the same way, only faster.

The laws: a swapped model's logits equal the original's to float32 rounding, and deferral decodes the same tokens
with the same per-answer report; only frozen float32 layers are swapped; a gradient still reaches the input of a
swapped layer, exactly; a composed model with swapped parents saves what trained and reloads to the same logits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llm_modules import LLMModulesForCausalLM
from llm_modules.model.onednn import OneDNNLinear, use_onednn_linears

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")

DEFER = dict(topology="fusion", memory="sequence", head="source_mix", fusion_layers=[], adapter_dim=16,
             attention_dropout=0.0, mixture_gate="confidence", call_gate=True)


def deferring_model(model_folder, tokenizer, **extra) -> LLMModulesForCausalLM:
    parents = model_folder("qwen2", hidden=48), model_folder("llama", seed=1)  # built (drawing numbers) before seeding
    torch.manual_seed(0)
    model = LLMModulesForCausalLM.compose(*parents, tokenizer=tokenizer, **DEFER, **extra).eval()
    with torch.no_grad():  # a call gate that varies with the target, η at its upper quartile: η splits the positions
        model.head.mixture.call_gate.weight.normal_(0, 0.5)
        batch = tokenizer(["The quick brown fox jumps", "A small model reads a large one"], return_tensors="pt",
                          padding=True)
        target = model.target(**batch, output_hidden_states=True)
        scores = model.head.mixture.call_score(target.hidden_states[-1], target.logits.float().log_softmax(-1))
    model.config.defer_threshold = float(scores[batch.attention_mask.bool()].quantile(0.75))
    return model


def test_swapped_model_decodes_as_the_original(model_folder, tokenizer):
    model = deferring_model(model_folder, tokenizer)
    tokenizer.padding_side = "left"
    batch = tokenizer(["The quick brown fox", "A small model reads"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    before = model.generate(**batch, max_new_tokens=8, do_sample=False)
    report = model.last_deferral.report()
    fractions = [row["source_position_fraction"] for row in report]
    assert 0 < sum(fractions) / len(fractions) < 1  # deferral really skips and really calls here

    swapped = use_onednn_linears(model)  # the frozen parents; the trained gates stay as they are
    assert swapped == sum(isinstance(m, OneDNNLinear) for m in model.modules()) > 0
    assert all(m.weight.requires_grad for m in model.modules() if type(m) is nn.Linear)
    assert any(type(m) is nn.Linear for m in model.head.mixture.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(model.generate(**batch, max_new_tokens=8, do_sample=False), before)
    assert model.last_deferral.report() == report


def test_a_bfloat16_source_with_a_swapped_float32_target_defers_as_before(model_folder, tokenizer):
    """The library's own mix on a CPU that computes bf16 (model/loading.py): the frozen source in bf16 keeps torch's
    kernels, the float32 target and gates go through oneDNN, and deferral decodes the same tokens and report."""
    model = deferring_model(model_folder, tokenizer, source_dtype="bfloat16")
    assert model.source.dtype == torch.bfloat16 and model.target.dtype == torch.float32
    tokenizer.padding_side = "left"
    batch = tokenizer(["The quick brown fox", "A small model reads"], return_tensors="pt", padding=True)
    before = model.generate(**batch, max_new_tokens=8, do_sample=False)
    report = model.last_deferral.report()
    fractions = [row["source_position_fraction"] for row in report]
    assert 0 < sum(fractions) / len(fractions) < 1  # deferral really skips and really calls here

    assert use_onednn_linears(model.requires_grad_(False)) > 0
    assert not any(isinstance(m, OneDNNLinear) for m in model.source.modules())
    assert any(isinstance(m, OneDNNLinear) for m in model.target.modules())
    assert torch.equal(model.generate(**batch, max_new_tokens=8, do_sample=False), before)
    assert model.last_deferral.report() == report


def test_only_frozen_float32_layers_are_swapped():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8).to(torch.bfloat16))
    model[1].requires_grad_(False)
    model[2].requires_grad_(False)
    assert use_onednn_linears(model) == 1
    assert [type(m).__name__ for m in model] == ["Linear", "OneDNNLinear", "Linear"]


def test_gradient_reaches_the_input_of_a_swapped_layer():
    torch.manual_seed(0)
    dense = nn.Linear(16, 32).requires_grad_(False)
    swapped = OneDNNLinear(dense)
    x = torch.randn(2, 3, 16, requires_grad=True)
    (dense(x) ** 2).sum().backward()
    expected, x.grad = x.grad, None
    (swapped(x) ** 2).sum().backward()
    torch.testing.assert_close(x.grad, expected)


def test_bfloat16_input_is_refused_with_the_reason():
    swapped = OneDNNLinear(nn.Linear(4, 4))
    with pytest.raises(TypeError, match="float32"), torch.no_grad():
        swapped(torch.randn(1, 4, dtype=torch.bfloat16))


def test_saved_after_the_swap_reloads_to_the_same_logits(model_folder, tokenizer, tmp_path):
    model = deferring_model(model_folder, tokenizer)
    use_onednn_linears(model)
    batch = tokenizer(["The quick brown fox"], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    model.save_pretrained(tmp_path / "saved")
    reloaded = LLMModulesForCausalLM.from_pretrained(tmp_path / "saved").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, logits, rtol=1e-5, atol=1e-5)


def test_the_server_swaps_on_request_and_decodes_the_same(model_folder, tokenizer, tmp_path):
    from llm_modules import LLMModulesError
    from llm_modules.serving.models import load_served_models

    deferring_model(model_folder, tokenizer).save_pretrained(tmp_path / "defers")
    tokenizer.padding_side = "left"
    batch = tokenizer(["The quick brown fox", "A small model reads"], return_tensors="pt", padding=True)
    (plain,) = load_served_models(tmp_path / "defers")
    fast, source_alone = load_served_models(tmp_path / "defers", compare=["source"], cpu_linear="onednn")
    assert not any(isinstance(m, OneDNNLinear) for m in plain.model.modules())
    assert any(isinstance(m, OneDNNLinear) for m in fast.model.modules())
    assert "float32 linear layers through oneDNN" in fast.note and plain.note is None
    assert "swapped nothing" not in source_alone.note  # the composed model's own source, swapped with it
    expected = plain.model.generate(**batch, max_new_tokens=6, do_sample=False)
    assert torch.equal(fast.model.generate(**batch, max_new_tokens=6, do_sample=False), expected)
    with pytest.raises(LLMModulesError, match="--device cpu"):
        load_served_models(tmp_path / "defers", device="cuda", cpu_linear="onednn")


def test_a_swapped_deferring_model_stays_causal(model_folder, tokenizer):
    """Perturb the future: with oneDNN linears and η set, the past positions' logits do not move."""
    model = deferring_model(model_folder, tokenizer)
    use_onednn_linears(model)
    ids = tokenizer(["The quick brown fox jumps over the lazy dog"], return_tensors="pt").input_ids
    changed = ids.clone()
    changed[:, 6:] = torch.randint(5, 200, changed[:, 6:].shape)
    with torch.no_grad():
        original, perturbed = model(input_ids=ids).logits, model(input_ids=changed).logits
    torch.testing.assert_close(perturbed[:, :6], original[:, :6], rtol=0, atol=1e-6)
    assert not torch.allclose(perturbed[:, 6:], original[:, 6:])  # the perturbation reached the future
