"""Fusion topology: identity at init, the causal law across two tokenizers, cached = recomputed generation,
save/load, what trains, and the errors a user gets."""

from __future__ import annotations

import random

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from llm_modules import LLMModulesError, LLMModulesForCausalLM
from llm_modules.model.fusion import decoder_layers
from llm_modules.model.processing import MAIN, CompositionProcessor
from llm_modules.model.source import read_source
from llm_modules.tiny import build_tokenizer, save_tiny, tiny_model

TEXTS = ["The quick brown fox jumps over the lazy dog.", "A small model"]
LONG = "The quick brown fox jumps over the lazy dog. Knowledge moves from a frozen source model."
SMALL = dict(adapter_dim=16, attention_dropout=0.0, fusion_every=1)


@pytest.fixture(scope="module")
def other_tokenizer():
    """A second tokenizer over the same corpus with fewer merges: it splits words differently."""
    return build_tokenizer(vocab_size=300)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tokenizer, other_tokenizer):
    """folder(family, tokenizer="one"|"other", seed=0, **config) -> a tiny model saved with that tokenizer."""
    made: dict[tuple, str] = {}

    def make(family: str, which: str = "one", seed: int = 0, **config) -> str:
        key = (family, which, seed, tuple(sorted(config.items())))
        if key not in made:
            tok = tokenizer if which == "one" else other_tokenizer
            path = tmp_path_factory.mktemp(f"{family}-{which}-{seed}")
            made[key] = str(save_tiny(tiny_model(family, tok, seed=seed, **config), tok, path))
        return made[key]

    return make


def fuse(folder, tokenizer, other_tokenizer, target="llama", two_tokenizers=False, open_gates=True, **options):
    """A fusion model with a qwen2 source; the target reads with its own tokenizer (the other one if asked)."""
    target_tok = other_tokenizer if two_tokenizers else tokenizer
    source_folder, target_folder = folder("qwen2", hidden=48), folder(target, "other" if two_tokenizers else "one", seed=1)
    torch.manual_seed(0)  # after the folders: building one reseeds torch, so the blocks' init would depend on test order
    model = LLMModulesForCausalLM.compose(
        source_folder, target_folder, topology="fusion", tokenizer=target_tok, source_tokenizer=tokenizer,
        **{**SMALL, **options},
    ).eval()
    if open_gates:  # gates start at 0 (identity); open them so the source actually matters
        with torch.no_grad():
            for block in model.fusion.blocks:
                block.gate_alpha.fill_(1.0)
    return model


def target_alone_logits(model, inputs):
    positions = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model.target(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                            position_ids=positions).logits


@pytest.mark.parametrize("target", ["llama", "gpt_neo", "gpt2", "opt", "gpt_neox", "phi", "gemma"])
@pytest.mark.parametrize("memory", ["prompt", "sequence"])
def test_closed_gates_give_exactly_the_target_alone(folder, tokenizer, other_tokenizer, target, memory):
    model = fuse(folder, tokenizer, other_tokenizer, target, two_tokenizers=target == "llama", open_gates=False,
                 memory=memory)
    inputs = model.processor(TEXTS)
    with torch.no_grad():
        composed = model(**inputs).logits
    torch.testing.assert_close(composed, target_alone_logits(model, inputs), rtol=0, atol=1e-5)
    assert model.gate_values() == [0.0] * len(model.fusion.blocks)


def test_every_target_layer_can_carry_a_block_and_gates_open_change_the_output(folder, tokenizer, other_tokenizer):
    model = fuse(folder, tokenizer, other_tokenizer, "gpt_neo", fusion_layers=[0, 1], source_layers=[1, -1])
    assert len(model.fusion.blocks) == 2 and len(decoder_layers(model.target)) == 2
    inputs = model.processor(TEXTS)
    with torch.no_grad():
        composed = model(**inputs).logits
    assert (composed - target_alone_logits(model, inputs)).abs().max() > 1e-3


def _common_past(processor, text, other, cut, a_ids, b_ids):
    """Target positions whose ids agree in both texts and that end at or before the cut."""
    ends = processor.target_ends(text, a_ids)
    n = 0
    while n < min(len(a_ids), len(b_ids)) and a_ids[n] == b_ids[n] and ends[n] <= cut:
        n += 1
    return n


@pytest.mark.parametrize("two_tokenizers", [False, True])
def test_perturbing_the_future_text_leaves_the_past_unchanged(folder, tokenizer, other_tokenizer, two_tokenizers):
    model = fuse(folder, tokenizer, other_tokenizer, two_tokenizers=two_tokenizers, memory="sequence")
    leaky = fuse(folder, tokenizer, other_tokenizer, two_tokenizers=two_tokenizers, memory="sequence", leaky=True)
    rng = random.Random(0)
    leaked = 0.0
    for _ in range(12):  # cuts anywhere, mid-word included: the source reads exactly the text before each token's end
        cut = rng.randrange(5, len(LONG) - 5)
        other = LONG[:cut] + "".join(rng.choice("abcdefgh ijk.") for _ in range(15))
        a, b = model.processor([LONG]), model.processor([other])
        past = _common_past(model.processor, LONG, other, cut, a.input_ids[0].tolist(), b.input_ids[0].tolist())
        assert past > 0
        with torch.no_grad():
            torch.testing.assert_close(model(**a).logits[0, :past], model(**b).logits[0, :past], rtol=0, atol=1e-5)
            leaked = max(leaked, (leaky(**a).logits[0, :past] - leaky(**b).logits[0, :past]).abs().max().item())
    assert leaked > 1e-3  # the released padding-only mask reads the future


def test_a_tail_token_has_the_state_the_source_computes_on_the_prefix_alone(folder, tokenizer, other_tokenizer):
    model = fuse(folder, tokenizer, other_tokenizer, two_tokenizers=True, memory="sequence")
    processor = model.processor
    inputs = processor([LONG])
    groups = inputs.source_groups[0]
    assert (groups != MAIN).any() and (groups == MAIN).any()  # the two tokenizers split words differently
    states = model.source_states(inputs.source_input_ids, inputs.source_attention_mask, inputs.source_position_ids)
    from llm_modules.model.fusion import run_source, source_side

    side = source_side(model, inputs.input_ids, inputs.attention_mask, dict(inputs))
    with_tails = run_source(model.source, side, None, (-1,))[0][0]  # [S, d]
    ends = processor.target_ends(LONG, inputs.input_ids[0].tolist())
    for i in sorted({int(g) for g in groups if g != MAIN})[:6]:
        alone_ids = processor._source_tokens(LONG[: ends[i]])[0]
        alone = read_source(model.source, torch.tensor([alone_ids]), torch.ones(1, len(alone_ids), dtype=torch.long),
                            torch.arange(len(alone_ids))[None])[0][0]
        tail = (groups == i).nonzero().flatten()
        count = int(inputs.source_counts[0, i])
        torch.testing.assert_close(with_tails[tail], alone[count:], rtol=0, atol=1e-5)
        torch.testing.assert_close(with_tails[:count], alone[:count], rtol=0, atol=1e-5)
    assert states.shape[2] == 1


@pytest.mark.parametrize("memory", ["prompt", "sequence"])
@pytest.mark.parametrize("two_tokenizers", [False, True])
def test_cached_generation_equals_recomputation(folder, tokenizer, other_tokenizer, memory, two_tokenizers):
    model = fuse(folder, tokenizer, other_tokenizer, two_tokenizers=two_tokenizers, memory=memory)
    inputs = model.processor(TEXTS)
    settings = dict(max_new_tokens=10, do_sample=False, output_scores=True, return_dict_in_generate=True)
    cached = model.generate(**inputs, use_cache=True, **settings)
    recomputed = model.generate(**inputs, use_cache=False, **settings)
    assert torch.equal(cached.sequences, recomputed.sequences)
    torch.testing.assert_close(torch.stack(cached.scores), torch.stack(recomputed.scores), rtol=0, atol=1e-4)
    # the target's ids alone (what lm-eval or a pipeline passes) give the same generation
    ids_only = model.generate(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, **settings)
    assert torch.equal(ids_only.sequences, cached.sequences)
    # left padding changes nothing: each row alone scores the same as inside the padded batch
    for row, text in enumerate(TEXTS):
        alone = model.generate(**model.processor([text]), **settings)
        assert torch.equal(alone.sequences[0, -10:], cached.sequences[row, -10:])
        torch.testing.assert_close(torch.stack(alone.scores)[:, 0], torch.stack(cached.scores)[:, row], rtol=0, atol=1e-4)


def test_prompt_memory_reads_only_the_prompt(folder, tokenizer, other_tokenizer):
    model = fuse(folder, tokenizer, other_tokenizer, two_tokenizers=True, memory="prompt")
    prompt = "The quick brown fox"
    a = model.processor([prompt + " jumps over the lazy dog."], source_text=[prompt])
    b = model.processor([prompt + " sits under a green tree."], source_text=[prompt])
    assert torch.equal(a.source_input_ids, b.source_input_ids)
    with torch.no_grad():
        la, lb = model(**a).logits, model(**b).logits
    n = 0
    while a.input_ids[0, n] == b.input_ids[0, n]:
        n += 1
    torch.testing.assert_close(la[:, :n], lb[:, :n], rtol=0, atol=1e-5)
    # every completion token reads the whole prompt
    last = int(a.source_counts[0, -1])
    assert last == int(a.source_attention_mask.sum())


@pytest.mark.parametrize("train_target", ["none", "lora", "all"])
def test_save_load_round_trip_keeps_logits(folder, tokenizer, other_tokenizer, tmp_path, train_target):
    model = fuse(folder, tokenizer, other_tokenizer, two_tokenizers=True, memory="sequence", train_target=train_target,
                 lora_target_modules=["q_proj", "v_proj"] if train_target == "lora" else None)
    if train_target == "lora":
        with torch.no_grad():  # LoRA's B starts at zero; move it so the round trip is not trivially equal
            for name, parameter in model.target.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0, 0.1)
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as saved:
        keys = list(saved.keys())
    assert not any(k.startswith("source.") for k in keys)
    target_keys = [k for k in keys if k.startswith("target.")]
    if train_target == "none":
        assert not target_keys and all(k.startswith("fusion.") for k in keys)
    elif train_target == "lora":
        assert target_keys and all("lora_" in k for k in target_keys)
    else:
        assert len(target_keys) == len(list(model.target.parameters()))
    assert (tmp_path / "source_tokenizer").is_dir()
    inputs = model.processor(TEXTS)
    for loaded in (LLMModulesForCausalLM.from_pretrained(tmp_path), AutoModelForCausalLM.from_pretrained(tmp_path)):
        with torch.no_grad():
            torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)
        assert loaded.processor(TEXTS).source_input_ids.tolist() == inputs.source_input_ids.tolist()


@pytest.mark.parametrize("train_target", ["none", "lora", "all"])
def test_what_trains(folder, tokenizer, other_tokenizer, train_target):
    model = fuse(folder, tokenizer, other_tokenizer, memory="sequence", train_target=train_target, open_gates=False,
                 lora_target_modules=["q_proj", "v_proj"] if train_target == "lora" else None).train()
    source_before = {k: v.clone() for k, v in model.source.state_dict().items()}
    inputs = model.processor(TEXTS, padding_side="right")
    labels = inputs.input_ids.masked_fill(inputs.attention_mask == 0, -100)
    output = model(**inputs, labels=labels)
    output.loss.backward()
    groups = model.trainable_parameter_groups()
    assert groups["connector"] and all(p.grad is not None for p in model.fusion.parameters())
    target_trainable = [n for n, p in model.target.named_parameters() if p.requires_grad]
    if train_target == "none":
        assert not target_trainable and not groups["target"] and not model.target.training
    elif train_target == "lora":
        assert target_trainable and all("lora_" in n for n in target_trainable)
    else:
        assert len(target_trainable) == len(list(model.target.parameters()))
    torch.optim.SGD([p for g in groups.values() for p in g], lr=0.1).step()
    for key, value in model.source.state_dict().items():
        assert torch.equal(value, source_before[key]), key


@pytest.mark.parametrize("head,mixture_gate", [("source_mix", "state"), ("source_pointer", "state"),
                                               ("source_pointer", "confidence")])
def test_mixture_heads_with_one_tokenizer(folder, tokenizer, other_tokenizer, head, mixture_gate):
    model = fuse(folder, tokenizer, other_tokenizer, memory="sequence", head=head, mixture_gate=mixture_gate)
    inputs = model.processor(TEXTS)
    with torch.no_grad():
        logits = model(**inputs).logits
    torch.testing.assert_close(logits.logsumexp(-1), torch.zeros(logits.shape[:-1]), rtol=0, atol=1e-4)
    settings = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True)
    cached = model.generate(**inputs, **settings)
    recomputed = model.generate(**inputs, use_cache=False, **settings)
    assert torch.equal(cached.sequences, recomputed.sequences)


def test_gradient_checkpointing_gives_the_same_gradients(folder, tokenizer, other_tokenizer):
    grads = []
    for checkpointing in (False, True):
        model = fuse(folder, tokenizer, other_tokenizer, memory="sequence").train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        inputs = model.processor(TEXTS, padding_side="right")
        model(**inputs, labels=inputs.input_ids).loss.backward()
        grads.append(model.fusion.blocks[0].q.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_processor_aligns_by_characters(tokenizer, other_tokenizer):
    processor = CompositionProcessor(other_tokenizer, tokenizer, memory="sequence")
    assert not processor.shared
    inputs = processor(TEXTS)
    # every target token reads at least the source tokens that end strictly before it starts
    assert inputs.source_counts.shape == inputs.input_ids.shape
    assert bool((inputs.source_counts[:, 1:] >= inputs.source_counts[:, :-1]).all())
    derived = processor.align_ids(inputs.input_ids, inputs.attention_mask)
    for key in ("source_input_ids", "source_counts", "source_groups", "source_position_ids"):
        assert torch.equal(derived[key], inputs[key]), key
    shared = CompositionProcessor(tokenizer, tokenizer, memory="sequence")
    one = shared(TEXTS)
    assert shared.shared and torch.equal(one.source_input_ids, one.input_ids)


def test_bad_fusion_options_give_actionable_errors(folder, tokenizer, other_tokenizer):
    with pytest.raises(LLMModulesError, match="do not exist"):
        fuse(folder, tokenizer, other_tokenizer, fusion_layers=[5])
    with pytest.raises(LLMModulesError, match="one per fusion block"):
        fuse(folder, tokenizer, other_tokenizer, fusion_layers=[0, 1], source_layers=[0, 1, 2])
    # other_tokenizer is the suite's with fewer merges: its 300 ids name the same tokens, so every id both heads
    # produce is one vocabulary (issue 24); a truly different pair is refused below (first differing id named)
    assert fuse(folder, tokenizer, other_tokenizer, two_tokenizers=True, memory="sequence", head="source_mix",
                open_gates=False).processor.shared
    with pytest.raises(LLMModulesError, match="memory='sequence'"):
        fuse(folder, tokenizer, other_tokenizer, memory="prompt", head="source_pointer")
    with pytest.raises(LLMModulesError, match="head="):
        fuse(folder, tokenizer, other_tokenizer, head="new")
    with pytest.raises(LLMModulesError, match="memory="):
        fuse(folder, tokenizer, other_tokenizer, memory="everything")
    model = fuse(folder, tokenizer, other_tokenizer, memory="sequence")
    inputs = model.processor(TEXTS)
    with pytest.raises(LLMModulesError, match="source_counts"):
        model(input_ids=inputs.input_ids, source_input_ids=inputs.source_input_ids)


# ------------------------------------------------------------------------------- one vocabulary (issue 24)
def _appended(tokenizer, token="<|endoftext|>"):
    """The same tokenizer with one token appended past its end, as transformers 5 loads a Qwen2 folder that lacks
    <|endoftext|> (955 tokens against 954 for a tokenizer built from the very same tokenizer.json)."""
    import copy

    longer = copy.deepcopy(tokenizer)
    longer.add_special_tokens({"additional_special_tokens": [token]}, replace_extra_special_tokens=False)
    assert len(longer) == len(tokenizer) + 1 and longer.convert_tokens_to_ids(token) == len(tokenizer)
    return longer


def test_a_token_appended_past_the_other_head_is_still_one_vocabulary(folder, tokenizer, other_tokenizer):
    from llm_modules.model.processing import same_tokenizer, vocabulary_differences
    from llm_modules.training.semalign import align_vocabularies

    longer = _appended(tokenizer)
    assert vocabulary_differences(tokenizer, longer) == [] and same_tokenizer(tokenizer, longer)
    # the source's head has a row for the appended token; the target's head does not
    assert vocabulary_differences(tokenizer, longer, len(tokenizer), len(longer)) == []
    source_folder, target_folder = folder("qwen2", hidden=48), folder("llama", seed=1)
    model = LLMModulesForCausalLM.compose(source_folder, target_folder, topology="fusion", tokenizer=tokenizer,
                                          source_tokenizer=longer, memory="sequence", head="source_mix", **SMALL)
    assert model.config.shared_tokenizer and model.processor.shared
    inputs = model.processor(TEXTS)
    assert torch.equal(inputs.source_input_ids, inputs.input_ids)  # the source reads the target's ids as they are
    assert model(**inputs).logits.isfinite().all()
    alignment = align_vocabularies(longer, tokenizer, len(longer), len(tokenizer))  # SemAlign: the same rule
    assert alignment.source_ids == alignment.target_ids == list(range(len(tokenizer)))


def test_tokenizers_that_differ_below_both_heads_are_refused_naming_the_first_differing_id(
        folder, tokenizer, tmp_path):
    different = build_tokenizer(["completely different words for another vocabulary entirely"], vocab_size=300)
    target_folder = save_tiny(tiny_model("llama", different, seed=1), different, tmp_path / "target")
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    other_by_id = {i: t for t, i in different.get_vocab().items()}
    rows = min(len(tokenizer), len(different))
    first = min(i for i in range(rows) if by_id.get(i) != other_by_id.get(i))
    with pytest.raises(LLMModulesError) as error:
        LLMModulesForCausalLM.compose(folder("qwen2", hidden=48), target_folder, topology="fusion", tokenizer=different,
                                      source_tokenizer=tokenizer, memory="sequence", head="source_mix", **SMALL)
    message = str(error.value)
    assert f"the first differing ids: id {first}: target {other_by_id.get(first)!r}, source {by_id.get(first)!r}" in (
        message), message
    assert "head='target'" in message


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("head", ["source_mix", "source_pointer"])
def test_a_mixture_head_reads_the_source_at_its_own_token_whatever_the_padding_side(folder, tokenizer,
                                                                                    other_tokenizer, side, head):
    """Teacher-forced and leak-probe scoring (evaluation/factworld/metrics.py) pad on the right and give the target's
    ids alone; the mixture reads the derived source states by column, so they must sit in the target's columns."""
    model = fuse(folder, tokenizer, other_tokenizer, memory="sequence", head=head)
    rows = [tokenizer(text, add_special_tokens=False).input_ids for text in TEXTS]
    assert len(rows[0]) != len(rows[1])
    length, pad = max(map(len, rows)), tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (length - len(r)) if side == "right" else [pad] * (length - len(r)) + r
                        for r in rows])
    mask = (torch.arange(length)[None] < torch.tensor([[len(r)] for r in rows])).long()
    if side == "left":
        mask = mask.flip(-1)
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask).logits
        for b, row in enumerate(rows):
            alone = model(input_ids=torch.tensor([row])).logits[0]
            assert torch.allclose(batched[b][mask[b].bool()], alone, atol=1e-4), (side, head, b)
