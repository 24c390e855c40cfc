"""The composed model: build, train step, causality, caching, save/load, errors."""

from __future__ import annotations

import threading

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, TextIteratorStreamer

from llm_modules import LLMModulesError, LLMModulesForCausalLM
from llm_modules.model.heads import SourceMixture, confidence_features
from llm_modules.model.masks import cross_attention_allowed, token_end_offsets
from llm_modules.model.loss import causal_lm_loss

SMALL = dict(heads=4, adapter_dim=16)
PAIRS = [
    ("qwen2", "gpt_neo"),  # the paper's pair
    ("llama", "gpt2"),
    ("gpt_neox", "opt"),
    ("mistral", "phi"),
    ("gemma", "llama"),
    ("phi", "gpt_neox"),
]
TEXTS = ["The quick brown fox jumps over the lazy dog.", "A small model"]


def compose(model_folder, source="qwen2", target="gpt_neo", **options):
    torch.manual_seed(0)
    model = LLMModulesForCausalLM.compose(
        model_folder(source, hidden=48), model_folder(target), **{**SMALL, "attention_dropout": 0.0, **options}
    )
    return model.eval()


def batch(tokenizer, texts=TEXTS):
    return tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")


@pytest.mark.parametrize("source,target", PAIRS)
def test_families_compose_train_and_generate(model_folder, tokenizer, source, target):
    model = compose(model_folder, source, target).train()
    inputs = batch(tokenizer)
    labels = inputs.input_ids.masked_fill(inputs.attention_mask == 0, -100)
    output = model(**inputs, labels=labels)
    assert output.logits.shape == (*inputs.input_ids.shape, model.config.vocab_size)
    assert torch.isfinite(output.loss)
    output.loss.backward()
    assert all(p.grad is not None for p in model.connector.parameters() if p.requires_grad)
    generated = model.eval().generate(**inputs, max_new_tokens=5, do_sample=False)
    assert generated.shape == (2, inputs.input_ids.shape[1] + 5)


@pytest.mark.parametrize(
    "source,target,head,mixture_gate",
    [(*PAIRS[0], "new", "state"), (*PAIRS[1], "new", "state"), (*PAIRS[0], "source", "state"),
     (*PAIRS[0], "source_mix", "state"), (*PAIRS[0], "source_pointer", "state"),
     (*PAIRS[0], "source_mix", "confidence")],
)
def test_perturbing_the_future_leaves_past_logits_unchanged(model_folder, tokenizer, source, target, head,
                                                           mixture_gate):
    ids = tokenizer("The quick brown fox jumps over the lazy dog again", return_tensors="pt").input_ids
    cut = ids.shape[1] // 2
    perturbed = ids.clone()
    perturbed[:, cut + 1 :] = torch.randint(10, 300, perturbed[:, cut + 1 :].shape, generator=torch.Generator().manual_seed(0))
    causal = compose(model_folder, source, target, head=head, mixture_gate=mixture_gate)
    with torch.no_grad():
        a, b = causal(ids).logits, causal(perturbed).logits
    torch.testing.assert_close(a[:, : cut + 1], b[:, : cut + 1], rtol=0, atol=1e-5)
    assert (a[:, cut + 1 :] - b[:, cut + 1 :]).abs().max() > 1e-3  # the future itself did change

    leaky = compose(model_folder, source, target, leaky=True, head=head, mixture_gate=mixture_gate)
    with torch.no_grad():
        a, b = leaky(ids).logits, leaky(perturbed).logits
    assert (a[:, : cut + 1] - b[:, : cut + 1]).abs().max() > 1e-3  # the released mask reads the future


def test_only_bridge_parameters_train_and_source_is_untouched(model_folder, tokenizer):
    model = compose(model_folder).train()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(not name.startswith("source.") for name in trainable)
    assert not any(name.startswith("target.") and "wte" in name for name in trainable)  # unused token embeddings
    groups = model.trainable_parameter_groups()
    assert sum(len(g) for g in groups.values()) == len(trainable) and groups["connector"] and groups["target"]
    before = {k: v.clone() for k, v in model.source.state_dict().items()}
    trained_before = model.get_output_embeddings().weight.clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    inputs = batch(tokenizer)
    model(**inputs, labels=inputs.input_ids).loss.backward()
    optimizer.step()
    assert not model.source.training
    for key, value in model.source.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not torch.equal(model.get_output_embeddings().weight, trained_before)


@pytest.mark.parametrize("source,target,head", [(*PAIRS[0], "new"), (*PAIRS[3], "new"), (*PAIRS[0], "source_pointer")])
def test_cached_generation_equals_full_recomputation(model_folder, tokenizer, source, target, head):
    model = compose(model_folder, source, target, head=head)
    inputs = batch(tokenizer)
    settings = dict(max_new_tokens=12, do_sample=False, output_scores=True, return_dict_in_generate=True)
    cached = model.generate(**inputs, use_cache=True, **settings)
    recomputed = model.generate(**inputs, use_cache=False, **settings)
    assert torch.equal(cached.sequences, recomputed.sequences)
    torch.testing.assert_close(torch.stack(cached.scores), torch.stack(recomputed.scores), rtol=0, atol=1e-4)
    # Left padding changes nothing: each row alone scores the same as inside the padded batch.
    for row, text in enumerate(TEXTS):
        alone = model.generate(**tokenizer(text, return_tensors="pt"), **settings)
        assert torch.equal(alone.sequences[0, -12:], cached.sequences[row, -12:])
        torch.testing.assert_close(
            torch.stack(alone.scores)[:, 0], torch.stack(cached.scores)[:, row], rtol=0, atol=1e-4
        )


def test_leaky_generation_recomputes_the_prefix(model_folder, tokenizer):
    model = compose(model_folder, leaky=True)
    inputs = tokenizer("The quick brown", return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    ids = inputs.input_ids
    with torch.no_grad():
        for _ in range(4):  # the release's loop: whole prefix, last position
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, ids)


def test_sampling_and_streaming(model_folder, tokenizer):
    model = compose(model_folder)
    inputs = batch(tokenizer)
    torch.manual_seed(1)
    first = model.generate(**inputs, max_new_tokens=6, do_sample=True, temperature=0.9, top_p=0.95)
    torch.manual_seed(1)
    second = model.generate(**inputs, max_new_tokens=6, do_sample=True, temperature=0.9, top_p=0.95)
    assert torch.equal(first, second)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    single = tokenizer("The quick", return_tensors="pt")
    thread = threading.Thread(
        target=model.generate, kwargs=dict(**single, max_new_tokens=6, do_sample=False, streamer=streamer)
    )
    thread.start()
    streamed = "".join(streamer)
    thread.join()
    expected = model.generate(**single, max_new_tokens=6, do_sample=False)
    assert streamed == tokenizer.decode(expected[0, single.input_ids.shape[1] :])


@pytest.mark.parametrize("head", ["source_mix", "source_pointer"])
def test_mixture_heads_return_normalised_log_probabilities(model_folder, tokenizer, head):
    model = compose(model_folder, head=head)
    with torch.no_grad():
        logits = model(**batch(tokenizer)).logits
    torch.testing.assert_close(logits.logsumexp(-1), torch.zeros(logits.shape[:-1]), rtol=0, atol=1e-4)


def test_a_confidence_gate_defers_to_the_source_where_the_base_head_is_unsure():
    """The gate reads each path's largest probability and entropy; the same hidden state then defers or not."""
    vocab, d_target = 50, 8
    mixture = SourceMixture(d_target, d_source=8, pointer=False, confidence=True)
    with torch.no_grad():
        mixture.mix_gate.weight.zero_()
        mixture.mix_gate.weight[0, d_target + 2] = -20.0  # features: [source max p, source entropy, base max p, ...]
        mixture.mix_gate.bias.fill_(10.0)  # gate logit = 10 - 20 * (the base head's largest probability)
    hidden = torch.randn(1, 2, d_target)
    source = torch.zeros(1, 2, vocab)
    source[..., 7] = 10.0  # the source is sure of token 7 at both positions
    base = torch.zeros(1, 2, vocab)
    base[0, 1, 3] = 30.0  # the base head: flat at position 0, sure of token 3 at position 1
    mixed = mixture(hidden, base, lambda states: source, torch.zeros(1, 2, 8))[0].exp()
    assert mixed[0, 0].argmax() == 7 and mixed[0, 0, 7] > 0.9  # unsure base: the source's word
    assert mixed[0, 1].argmax() == 3 and mixed[0, 1, 3] > 0.9  # sure base: its own word
    features = confidence_features(torch.stack([base[0, 0], base[0, 1]]).log_softmax(-1))
    torch.testing.assert_close(features, torch.tensor([[1 / vocab, 1.0], [1.0, 0.0]]), atol=1e-4, rtol=0)


def test_a_mixture_head_trains_its_new_head_on_its_own_cross_entropy_too(model_folder, tokenizer):
    model = compose(model_folder, head="source_pointer").train()
    inputs = batch(tokenizer)
    labels = inputs.input_ids.masked_fill(inputs.attention_mask == 0, -100)
    output = model(**inputs, labels=labels)
    assert output.head_logits is not None
    expected = causal_lm_loss(output.logits, labels) + causal_lm_loss(output.head_logits, labels)
    torch.testing.assert_close(output.loss, expected)
    evaluated = model.eval()(**inputs, labels=labels)
    assert evaluated.head_logits is None  # inference returns only the mixture, and reports its loss alone
    torch.testing.assert_close(evaluated.loss, causal_lm_loss(evaluated.logits, labels))


@pytest.mark.parametrize("head,mixture_gate", [("new", "state"), ("source_mix", "state"), ("source_pointer", "state"),
                                               ("source_mix", "confidence")])
def test_save_load_round_trip_keeps_logits_and_stores_no_source(model_folder, tokenizer, tmp_path, head, mixture_gate):
    model = compose(model_folder, gate="tanh", head=head, mixture_gate=mixture_gate)
    with torch.no_grad():  # move the gates off zero so the round trip is not trivially equal
        for layer in model.connector.layers:
            layer.gate_alpha.fill_(0.3)
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as saved:
        keys = list(saved.keys())
    assert keys and not any(k.startswith("source.") for k in keys)
    assert not any("wte" in k for k in keys)
    assert (tmp_path / "README.md").read_text().count(model.config.source_name_or_path) >= 1
    inputs = batch(tokenizer)
    for loaded in (LLMModulesForCausalLM.from_pretrained(tmp_path), AutoModelForCausalLM.from_pretrained(tmp_path)):
        assert isinstance(loaded, LLMModulesForCausalLM)
        with torch.no_grad():
            torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)
        assert loaded.tokenizer(TEXTS[0]).input_ids == tokenizer(TEXTS[0]).input_ids


def test_tanh_gate_starts_closed(model_folder, tokenizer):
    model = compose(model_folder, gate="tanh", connector_layers=3)
    states = torch.randn(1, 5, 48)
    allowed = cross_attention_allowed(torch.arange(5)[None], torch.arange(5)[None])
    full, _ = model.connector(states, allowed)
    bare = model.connector.intermediate(model.connector.pre_proj(states))
    torch.testing.assert_close(full, bare + model.connector.proj(model.connector.pre_proj(states)))
    assert model.connector.gate_values() == [0.0, 0.0, 0.0]


def test_character_offset_rule_matches_index_rule_for_one_tokenizer(tokenizer):
    encoded = tokenizer(TEXTS, return_tensors="pt", padding=True, return_offsets_mapping=True)
    ends = token_end_offsets(encoded.offset_mapping, encoded.attention_mask)
    by_offsets = cross_attention_allowed(ends, ends, encoded.attention_mask)
    positions = torch.arange(ends.shape[1]).expand_as(ends)
    by_index = cross_attention_allowed(positions, positions, encoded.attention_mask)
    real = encoded.attention_mask.bool()
    assert torch.equal(by_offsets[real], by_index[real])
    # A target token ending mid-way through a source token cannot read that source token.
    query_ends = torch.tensor([[3, 7]])
    key_ends = torch.tensor([[2, 5, 7]])
    assert cross_attention_allowed(query_ends, key_ends).tolist() == [[[True, False, False], [True, True, True]]]


def test_bad_inputs_give_actionable_errors(model_folder, tokenizer, tmp_path):
    with pytest.raises(LLMModulesError, match="does not exist"):
        LLMModulesForCausalLM.compose("./no/such/model", model_folder("gpt_neo"))
    with pytest.raises(LLMModulesError, match="mixture_gate='entropy' is not supported; choose one of 'state'"):
        compose(model_folder, head="source_mix", mixture_gate="entropy")
    with pytest.raises(LLMModulesError, match="gate"):
        compose(model_folder, gate="relu")
    with pytest.raises(LLMModulesError, match="unknown option"):
        compose(model_folder, layers=3)
    with pytest.raises(ValueError, match="divisible"):
        compose(model_folder, heads=5)
    with pytest.raises(LLMModulesError, match="PreTrainedModel"):
        LLMModulesForCausalLM.compose(torch.nn.Linear(2, 2), model_folder("gpt_neo"), tokenizer=tokenizer)
    with pytest.raises(LLMModulesError, match="save_pretrained"):
        LLMModulesForCausalLM.from_pretrained(tmp_path)

    class NoStates(torch.nn.Module):  # a base model that returns logits only
        def forward(self, **kwargs):
            return {"logits": torch.zeros(1)}

    model = compose(model_folder)
    model.source.base_model_prefix = "no_states"
    model.source.no_states = NoStates()
    with pytest.raises(LLMModulesError, match="no hidden state"):
        model(**batch(tokenizer))


def test_length_beyond_learned_positions_is_refused(model_folder, tokenizer):
    model = LLMModulesForCausalLM.compose(
        model_folder("qwen2", hidden=48), model_folder("gpt_neo", max_positions=8), **SMALL
    )
    with pytest.raises(LLMModulesError, match="max_position_embeddings=8"):
        model(torch.ones(1, 9, dtype=torch.long))


def test_gradient_checkpointing_gives_the_same_gradients(model_folder, tokenizer):
    inputs = batch(tokenizer)
    grads = []
    for checkpointing in (False, True):
        model = compose(model_folder).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
            assert model.is_gradient_checkpointing
        model(**inputs, labels=inputs.input_ids).loss.backward()
        grads.append(model.connector.pre_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_ids_the_source_cannot_embed_are_never_predicted(model_folder, tokenizer):
    """The head is sized by the tokenizer; an entry beyond the source's embedding table must never be emitted
    (sampling one used to crash the source on the next step)."""
    model = compose(model_folder)
    readable = model.source.get_input_embeddings().num_embeddings
    model.config.vocab_size = readable + 2
    model.head.linear = torch.nn.Linear(model.head.linear.in_features, readable + 2, bias=False)
    with torch.no_grad():
        model.head.linear.weight[readable:] = 100.0  # these ids would win every argmax and every sample
        logits = model(**batch(tokenizer)).logits
    assert logits.shape[-1] == readable + 2 and int(logits.argmax(-1).max()) < readable
    torch.manual_seed(0)
    generated = model.generate(**batch(tokenizer), max_new_tokens=4, do_sample=True)
    assert int(generated.max()) < readable
