"""Deferral decoding (model/deferral.py): the source runs only where a gate that reads the target alone asks.

The laws: η = 0 is the every-token mixture; a chunked catch-up leaves the source's cache exactly as running it at
every step; cached decoding equals recomputing; rows of a batch decide on their own; a saved model defers as
trained; a combination that cannot defer says why."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from llm_modules import LLMModulesError, LLMModulesForCausalLM
from llm_modules.model.source import read_source

PROMPTS = ["The quick brown fox", "A small model reads"]
DEFER = dict(topology="fusion", memory="sequence", head="source_mix", fusion_layers=[], adapter_dim=16,
             attention_dropout=0.0)


def compose(model_folder, tokenizer, **options):
    torch.manual_seed(0)
    model = LLMModulesForCausalLM.compose(model_folder("qwen2", hidden=48), model_folder("llama", seed=1),
                                          tokenizer=tokenizer, **{**DEFER, **options}).eval()
    with torch.no_grad():  # a gate that varies with the target's state and confidence, so that η splits positions
        model.head.mixture.mix_gate.weight.normal_(0, 0.5)
        if model.head.mixture.call_gate is not None:
            model.head.mixture.call_gate.weight.normal_(0, 0.5)
    return model


def inputs(tokenizer, prompts=PROMPTS):
    tokenizer.padding_side = "left"
    return tokenizer(prompts, return_tensors="pt", padding=True)


def generate(model, batch, threshold, **extra):
    model.config.defer_threshold = threshold
    return model.generate(**batch, max_new_tokens=8, do_sample=False, output_scores=True,
                          return_dict_in_generate=True, **extra)


def weights_seen(model, batch) -> torch.Tensor:
    """The deciding gate's score at every position of a teacher-forced pass over the prompts."""
    model.config.defer_threshold = None
    with torch.no_grad():
        output = model.target(**batch, output_hidden_states=True)
        return model.head.mixture.call_score(output.hidden_states[-1], output.logits.float().log_softmax(-1))


CALL_GATE = dict(mixture_gate="confidence", call_gate=True)  # the mixture reads both; a call gate decides


@pytest.mark.parametrize("options", [dict(mixture_gate="state"), dict(mixture_gate="target_confidence"), CALL_GATE],
                         ids=["state", "target_confidence", "call_gate"])
def test_threshold_zero_is_the_every_token_mixture(model_folder, tokenizer, options):
    model = compose(model_folder, tokenizer, **options)
    batch = inputs(tokenizer)
    every = generate(model, batch, None)
    deferred = generate(model, batch, 0.0)
    assert torch.equal(every.sequences, deferred.sequences)
    for a, b in zip(every.scores, deferred.scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    report = model.last_deferral.report()
    assert [r["source_position_fraction"] for r in report] == [1.0, 1.0]
    assert report[0]["source_calls"] == 8  # the prompt, then one per new token


def test_catch_up_leaves_the_source_cache_as_running_at_every_step(model_folder, tokenizer):
    model = compose(model_folder, tokenizer)
    batch = inputs(tokenizer)
    ids, mask = batch.input_ids, batch.attention_mask
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    stepwise, chunked = DynamicCache(config=model.source.config), DynamicCache(config=model.source.config)
    with torch.no_grad():
        steps = [read_source(model.source, ids[:, i:i + 1], mask[:, :i + 1], positions[:, i:i + 1], (-1,), stepwise)[0]
                 for i in range(ids.shape[1])]
        head = read_source(model.source, ids[:, :2], mask[:, :2], positions[:, :2], (-1,), chunked)[0]
        tail = read_source(model.source, ids[:, 2:], mask, positions[:, 2:], (-1,), chunked)[0]
    torch.testing.assert_close(torch.cat([head, tail], 1), torch.cat(steps, 1), rtol=1e-5, atol=1e-5)
    for layer in range(len(stepwise.layers)):
        torch.testing.assert_close(chunked.layers[layer].keys, stepwise.layers[layer].keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(chunked.layers[layer].values, stepwise.layers[layer].values, rtol=1e-5, atol=1e-5)


def split_threshold(model, batch) -> float:
    """An η that splits the decoded positions: the median source weight over the tokens η = 0 decodes."""
    sequences = generate(model, batch, 0.0).sequences
    mask = torch.cat([batch.attention_mask, torch.ones_like(sequences[:, batch.input_ids.shape[1]:])], 1)
    weights = weights_seen(model, {"input_ids": sequences, "attention_mask": mask})
    return float(weights[:, batch.input_ids.shape[1] - 1:-1].median())


@pytest.mark.parametrize("head,options", [("source_mix", {}), ("source_pointer", {}), ("source_mix", CALL_GATE),
                                          ("source_pointer", CALL_GATE)])
def test_deferring_some_positions_equals_recomputing_with_the_source_everywhere(model_folder, tokenizer, head, options):
    """Cached deferral (the source reads only when asked, in chunks) gives the same tokens and scores as the
    uncached forward, where the source reads everything and the gate's choice is applied afterwards."""
    model = compose(model_folder, tokenizer, head=head, **{"mixture_gate": "target_confidence", **options})
    for batch in (inputs(tokenizer), inputs(tokenizer, PROMPTS[:1])):
        threshold = split_threshold(model, batch)
        cached = generate(model, batch, threshold)
        report = model.last_deferral.report()
        recomputed = generate(model, batch, threshold, use_cache=False)
        assert torch.equal(cached.sequences, recomputed.sequences)
        for a, b in zip(cached.scores, recomputed.scores):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        fractions = [r["source_position_fraction"] for r in report]
        assert 0.0 < sum(fractions) / len(fractions) < 1.0, fractions  # the threshold split the positions
    assert report[0]["source_calls"] < report[0]["positions"]  # one row: the source skipped the steps it was not asked


def test_rows_of_a_batch_defer_independently(model_folder, tokenizer):
    model = compose(model_folder, tokenizer, mixture_gate="target_confidence")
    batch = inputs(tokenizer)
    threshold = split_threshold(model, batch)
    together = generate(model, batch, threshold).sequences
    for row, prompt in enumerate(PROMPTS):
        alone = generate(model, inputs(tokenizer, [prompt]), threshold).sequences[0]
        assert torch.equal(together[row][-len(alone):], alone)


@pytest.mark.parametrize("options", [dict(mixture_gate="target_confidence"), CALL_GATE], ids=["mixture_gate", "call_gate"])
def test_a_saved_model_defers_as_trained(model_folder, tokenizer, tmp_path, options):
    model = compose(model_folder, tokenizer, defer_threshold=0.5, **options)
    model.save_pretrained(tmp_path / "saved")
    loaded = LLMModulesForCausalLM.from_pretrained(tmp_path / "saved")
    assert loaded.config.defer_threshold == 0.5 and loaded.config.call_gate == options.get("call_gate", False)
    batch = inputs(tokenizer)
    expected = generate(model, batch, 0.5).sequences
    report = model.last_deferral.report()
    got = loaded.generate(**batch, max_new_tokens=8, do_sample=False)  # no extra argument
    assert torch.equal(got, expected) and loaded.last_deferral.report() == report


@pytest.mark.parametrize("options,message", [
    (dict(mixture_gate="confidence"), "reads only the target"),
    (dict(head="target", memory="prompt", call_gate=True, defer_threshold=None), "call_gate learns where a mixture"),
    (dict(topology="bridge", head="source_mix", memory="prompt", fusion_layers=None, call_gate=True,
          defer_threshold=None), "call_gate decides deferral, which needs topology='fusion'"),
    (dict(fusion_layers=None), "fusion_layers=\\[\\]"),
    (dict(head="target", memory="prompt"), "head='source_mix' or 'source_pointer'"),
    (dict(defer_threshold=1.5), "in \\[0, 1\\]"),
])
def test_a_combination_that_cannot_defer_says_why(model_folder, tokenizer, options, message):
    with pytest.raises(LLMModulesError, match=message):
        compose(model_folder, tokenizer, **{"defer_threshold": 0.5, **options})


def test_the_price_and_threshold_are_chosen_on_the_development_world_only():
    """defer_worlds.choose_deferral reads the development worlds' validation facts: the fewest source calls among
    the (λ, η) within SLACK of the every-token mixture's validation accuracy (mean over the development worlds);
    held-out worlds cannot move it, and retired worlds do not count as held out."""
    import defer_worlds as bench

    def world(seed, by_price, mix=0.9):
        """by_price: {λ: {η: (validation accuracy, validation source share, test accuracy)}}"""
        rows = {bench.DEMO_ROW.name: {"validation": [mix], "test": [{"all": mix, "seen": mix, "unseen": mix}]},
                "deferral": {}}
        for price, by_threshold in by_price.items():
            rows[bench.variant_spec(price).name] = {"validation": [mix],
                                                    "test": [{"all": mix, "seen": mix, "unseen": mix}]}
            rows["deferral"][price] = {
                str(t): {"validation": [v], "validation_decoding": [{"source_position_fraction": share}],
                         "test": [{"all": x, "seen": x, "unseen": x - 0.1}],
                         "decoding": [{"source_position_fraction": share / 2, "source_calls": 3}]}
                for t, (v, share, x) in by_threshold.items()}
        return {"world_seed": seed, "rows": rows}

    development = world(0, {"0": {0.2: (0.9, 0.5, 0), 0.5: (0.89, 0.3, 0), 0.8: (0.5, 0.1, 0)},
                            "0.3": {0.2: (0.9, 0.2, 0), 0.5: (0.85, 0.05, 0), 0.8: (0.5, 0.01, 0)}})
    assert bench.choose_deferral([development]) == ("0.3", 0.2)  # the fewest calls among those within SLACK
    # another development world where λ = 0.3 at η = 0.2 falls 10 points short: the mean moves the choice
    other = world(1, {"0": {0.2: (0.9, 0.5, 0), 0.5: (0.89, 0.3, 0), 0.8: (0.5, 0.1, 0)},
                      "0.3": {0.2: (0.8, 0.2, 0), 0.5: (0.85, 0.05, 0), 0.8: (0.5, 0.01, 0)}})
    assert bench.choose_deferral([development, other]) == ("0", 0.5)
    held_out = world(6, {"0": {0.2: (0, 1, 0.1), 0.5: (0, 1, 0.1), 0.8: (0, 1, 1.0)},
                         "0.3": {0.2: (0, 0.4, 0.85), 0.5: (1, 0, 1.0), 0.8: (1, 0, 1.0)}})
    retired = world(bench.RETIRED_WORLDS[0], {"0.3": {0.2: (0, 0, 0.0)}})
    worlds = {str(w): development for w in bench.DEVELOPMENT_WORLDS}
    summary = bench.summary({"worlds": {**worlds, "6": held_out, str(bench.RETIRED_WORLDS[0]): retired}})
    assert (summary["chosen_variant"], summary["chosen_threshold"], summary["held_out_worlds"]) == ("0.3", 0.2, [6])
    assert summary["defer_source_position_fraction"] == pytest.approx(0.2)
    assert summary["defer_accuracy_minus_mix"] == pytest.approx(100 * (0.75 - 0.9))  # min over seen and unseen
    nothing_within = world(0, {"0": {0.2: (0.5, 0.5, 0), 0.5: (0.6, 0.3, 0)}})
    assert bench.choose_deferral([nothing_within]) == ("0", 0.5)  # then the most accurate
    # the call gate, chosen: its headline is read on every held-out world but those read before it existed
    with_gate = world(0, {"0": {0.2: (0.9, 0.5, 0)}, bench.CALL_GATE: {0.1: (0.9, 0.2, 0)}})
    summary = bench.summary({"worlds": {**{str(w): with_gate for w in bench.DEVELOPMENT_WORLDS},
                                        "6": world(6, {bench.CALL_GATE: {0.1: (0, 0.1, 0.2)}}),
                                        "9": world(9, {bench.CALL_GATE: {0.1: (0, 0.1, 0.9)}}),
                                        "12": world(12, {bench.CALL_GATE: {0.1: (0, 0.1, 0.7)}})}})
    assert (summary["chosen_variant"], summary["held_out_worlds"]) == (bench.CALL_GATE, [9, 12])
    assert summary["held_out_accuracy"]["all"]["deferral"] == pytest.approx(0.8)
    assert summary["on_worlds_read_before"]["worlds"] == [6]
    # the safest rule within the budget: validation cannot tell η = 0.05 from 0.2, so it spends calls (up to 20%);
    # its held-out worlds are those it was written down before (14 and up)
    close_call = world(0, {bench.CALL_GATE: {0.05: (0.9, 0.19, 0), 0.2: (0.9, 0.15, 0), 0.01: (0.95, 0.3, 0)}})
    assert bench.choose_deferral([close_call]) == (bench.CALL_GATE, 0.2)
    assert bench.choose_safest_within_budget([close_call]) == (bench.CALL_GATE, 0.05)
    summary = bench.summary({"worlds": {**{str(w): close_call for w in bench.DEVELOPMENT_WORLDS},
                                        "9": world(9, {bench.CALL_GATE: {0.05: (0, 0.2, 0.5), 0.2: (0, 0.1, 0.5)}}),
                                        "14": world(14, {bench.CALL_GATE: {0.05: (0, 0.2, 0.9), 0.2: (0, 0.1, 0.5)}})}})
    # ... and once such a world is in, its choice is the headline (the first rule's under fewest_calls_rule)
    assert (summary["headline_rule"], summary["chosen_threshold"], summary["held_out_worlds"]) == (
        "safest_within_budget", 0.05, [14])
    assert summary["on_worlds_read_before"]["worlds"] == [9]
    assert summary["held_out_accuracy"]["all"]["deferral"] == pytest.approx(0.9)
    assert summary["defer_accuracy_minus_mix"] == pytest.approx(100 * (0.8 - 0.9))  # its unseen: 0.8 against 0.9
    assert (summary["fewest_calls_rule"]["chosen_threshold"], summary["fewest_calls_rule"]["held_out_worlds"]) == (
        0.2, [9, 14])
    facts = bench.summary({"kind": "facts", "worlds": {**{str(w): close_call for w in bench.DEVELOPMENT_WORLDS},
                                                       "14": world(14, {bench.CALL_GATE: {0.2: (0, 0.1, 0.5)}})}})
    assert (facts["chosen_threshold"], "headline_rule" in facts) == (0.2, False)  # the fact world's: the first rule


def test_the_server_serves_with_deferral_or_says_why_it_cannot(model_folder, tokenizer, tmp_path):
    from llm_modules.serving.models import load_served_models

    compose(model_folder, tokenizer, mixture_gate="target_confidence").save_pretrained(tmp_path / "defers")
    (served,) = load_served_models(tmp_path / "defers", defer_threshold=0.3)
    assert served.model.config.defer_threshold == 0.3
    served.model.generate(**inputs(tokenizer), max_new_tokens=3, do_sample=False)
    assert served.model.last_deferral is not None
    compose(model_folder, tokenizer, mixture_gate="confidence").save_pretrained(tmp_path / "reads-source")
    with pytest.raises(LLMModulesError, match="reads only the target"):
        load_served_models(tmp_path / "reads-source", defer_threshold=0.3)


@pytest.mark.parametrize("head,options", [("source_mix", {}), ("source_pointer", {}), ("source_mix", CALL_GATE),
                                          ("source_pointer", CALL_GATE)])
def test_perturbing_the_future_leaves_deferral_past_logits_unchanged(model_folder, tokenizer, head, options):
    """With η set, the forward applies the gate's choice per position: the past's logits must not see later tokens."""
    model = compose(model_folder, tokenizer, head=head, **{"mixture_gate": "target_confidence", **options})
    batch = inputs(tokenizer, PROMPTS[:1])
    model.config.defer_threshold = float(weights_seen(model, batch).median())
    ids = batch.input_ids
    cut = ids.shape[1] // 2
    perturbed = ids.clone()
    perturbed[:, cut:] = torch.randint(5, len(tokenizer), perturbed[:, cut:].shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits[:, :cut]
        after = model(input_ids=perturbed).logits[:, :cut]
    torch.testing.assert_close(before, after, rtol=0, atol=1e-5)
    assert not torch.equal(ids, perturbed)


def test_a_price_per_source_call_keeps_the_gate_off_positions_where_the_source_gains_little(model_folder, tokenizer):
    """defer_gsm8k's gate: the mixture's loss alone asks the source wherever it is even slightly better; with a
    price λ per call the gate asks it only where its gain at the gold token is worth λ nats."""
    import defer_gsm8k as bench

    model = compose(model_folder, tokenizer, mixture_gate="target_confidence")
    width, n = model.target.config.hidden_size, 256
    hard = torch.arange(n) % 2 == 0  # the source gains 2.9 nats here; 0.29 elsewhere
    hidden = torch.randn(n, width) * 0.1
    hidden[:, 0] = torch.where(hard, 1.0, -1.0)
    cached = {"hidden": hidden, "features": torch.rand(n, 2),
              "target": torch.where(hard, -3.0, -0.3), "source": torch.where(hard, -0.1, -0.01),
              "target_right": ~hard, "source_right": torch.ones(n, dtype=torch.bool)}
    shares = {}
    for call_cost in (0.0, 0.5):
        bench.train_gate(model, cached, epochs=300, lr=3e-2, call_cost=call_cost)  # one batch an epoch
        weights = 1 - model.head.mixture.weights_given(hidden, cached["features"])[:, -1].detach()
        shares[call_cost] = ((weights[hard] > 0.5).float().mean().item(), (weights[~hard] > 0.5).float().mean().item())
    assert shares[0.0][0] == 1.0 and shares[0.0][1] > 0.9  # free calls: the source (nearly) everywhere
    assert shares[0.5] == (1.0, 0.0)  # priced calls: only where it gains more than the price
    on_traces = bench.deferral_on_traces(model, cached, 0.5)
    assert on_traces["source_share"] == pytest.approx(0.5) and on_traces["token_accuracy"] == 1.0


def test_the_call_price_adds_its_nats_times_the_source_weight_at_each_trained_position(model_folder, tokenizer):
    """``source_call_price`` λ: the training loss is the unpriced one plus λ x the mean source weight over the trained
    predictions (padding and the last position excluded); evaluation reports the mixture's loss alone."""
    batch = inputs(tokenizer)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    losses = {}
    for price in (0.0, 0.7):
        model = compose(model_folder, tokenizer, mixture_gate="target_confidence", source_call_price=price).train()
        output = model(**batch, labels=labels)
        losses[price] = output.loss
    weights = weights_seen(model.eval(), batch)  # the same seeded gate in both models
    trained = labels[:, 1:] != -100
    torch.testing.assert_close(losses[0.7] - losses[0.0], 0.7 * weights[:, :-1][trained].mean(), rtol=1e-4, atol=1e-5)
    assert model(**batch, labels=labels).loss < losses[0.7]  # evaluation: no price, no base-head term


def test_a_priced_gate_trained_through_the_model_stays_shut_where_the_source_gains_little(model_folder, tokenizer):
    """The library path (forward(labels) in training mode, the loss Trainer and the fact-world harness use): a gate
    trained with a price opens less often than the same gate trained free, from the same start."""
    batch = inputs(tokenizer, ["The quick brown fox jumps over the lazy dog", "A small model reads a large one"])
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    opened = {}
    for price in (0.0, 2.0):
        model = compose(model_folder, tokenizer, mixture_gate="target_confidence", source_call_price=price).train()
        optimizer = torch.optim.Adam(model.head.mixture.parameters(), lr=5e-2)
        for _ in range(40):
            optimizer.zero_grad()
            model(**batch, labels=labels).loss.backward()
            optimizer.step()
        opened[price] = weights_seen(model.eval(), batch).mean().item()
    assert opened[2.0] < 0.2 < opened[0.0] - 0.2, opened


@pytest.mark.parametrize("options,message", [
    (dict(source_call_price=-0.1), ">= 0"),
    (dict(head="target", memory="prompt", source_call_price=0.5), "head='source_mix' or 'source_pointer'"),
])
def test_a_call_price_where_no_gate_calls_says_why(model_folder, tokenizer, options, message):
    with pytest.raises(LLMModulesError, match=message):
        compose(model_folder, tokenizer, **options)


def test_the_source_head_gets_row_major_strides_and_the_same_values():
    """A last-position slice of a chunk ([1, 1, d] with stride P*d) reaches the source's head as a row-major copy
    (on a CPU a bf16 linear reads such a view ~50x slower: benchmarks/strided_head.py); a row-major one is kept."""
    from llm_modules.model.modeling import with_row_major_strides

    chunk = torch.randn(1, 5, 8)
    last = chunk[:, -1:]
    assert last.is_contiguous() and last.stride() == (40, 8, 1)  # torch calls it contiguous; its first stride is P*d
    copied = with_row_major_strides(last)
    assert copied.stride() == (8, 8, 1) and torch.equal(copied, last)
    batch = torch.randn(2, 5, 8)[:, -1:]  # rows of a batch: not contiguous at all
    assert with_row_major_strides(batch).stride() == (8, 8, 1)
    fresh = torch.randn(2, 3, 8)
    assert with_row_major_strides(fresh) is fresh


def test_the_speed_benchmarks_write_what_the_readme_reads(tmp_path, monkeypatch):
    """benchmarks/defer_speed.py and catch_up_cost.py at tiny shapes: every configuration timed, the headline key
    the issue names, one timing per chunk size; both as JSON and Markdown."""
    import json

    import catch_up_cost
    import defer_speed

    for module in (catch_up_cost, defer_speed):
        monkeypatch.setattr(module, "RESULTS", tmp_path)
    catch_up_cost.main(["--shapes", "tiny", "--repeats", "1"])
    cost = json.loads((tmp_path / "catch-up-cost-tiny.json").read_text())
    assert set(cost["seconds"]) == {"float32", "float32+onednn", "bfloat16"}
    assert list(cost["seconds"]["float32"]) == [str(k) for k in catch_up_cost.CHUNKS]
    defer_speed.main(["--shapes", "tiny", "--repeats", "1", "--new-tokens", "4", "--prompt", "8"])
    speed = json.loads((tmp_path / "defer-speed-tiny-cpu-float32.json").read_text())
    assert {"target_alone", "source_alone", "fusion_prompt_memory", "every_token_mixture"} <= set(speed["rows"])
    assert sum(name.startswith("deferral_eta_") for name in speed["rows"]) == 3
    assert speed["rows"]["source_alone"]["vs_source_alone"] == 1.0
    assert "defer_end_to_end_vs_source" in speed["summary"]
    assert (tmp_path / "defer-speed-tiny-cpu-float32.md").exists() and (tmp_path / "catch-up-cost-tiny.md").exists()
    defer_speed.main(["--shapes", "tiny", "--repeats", "1", "--new-tokens", "4", "--prompt", "8", "--linear", "onednn"])
    assert json.loads((tmp_path / "defer-speed-tiny-cpu-float32-onednn.json").read_text())["linear"] == "onednn"
    # the library's own mix on a bf16 CPU: a bfloat16 source, a float32 target; the source alone is also timed in
    # float32, and every ratio is to the faster of the two in its round
    defer_speed.main(["--shapes", "tiny", "--repeats", "1", "--new-tokens", "4", "--prompt", "8", "--dtype", "bfloat16",
                      "--target-dtype", "float32", "--label", "run2"])
    mixed = json.loads((tmp_path / "defer-speed-tiny-cpu-bfloat16-target-float32-run2.json").read_text())
    assert mixed["target_dtype"] == "float32" and "source_alone_float32" in mixed["rows"]
    rows = mixed["rows"]
    fastest = min(rows["source_alone"]["seconds_each_round"][0], rows["source_alone_float32"]["seconds_each_round"][0])
    for name, row in rows.items():  # one round: each ratio is its time over the faster source alone's, not the bf16 one's
        assert row["vs_source_alone"] == pytest.approx(row["seconds_each_round"][0] / fastest), name


def test_defer_speed_refuses_bad_aims_with_what_it_expected(capsys):
    import defer_speed

    assert defer_speed.fraction_list("0.1,0.3") == (0.1, 0.3)
    for bad, message in (("0.1,x", "comma-separated shares"), ("1.5", "in (0, 1)")):
        with pytest.raises(SystemExit) as stopped:
            defer_speed.main(["--shapes", "tiny", "--aims", bad])
        assert stopped.value.code == 2 and message in capsys.readouterr().err


def test_defer_worlds_refuses_a_bad_variant_list_with_what_it_expected(capsys):
    import defer_worlds as bench

    assert bench.variant_list("0,0.30,call_gate") == ("0", "0.3", "call_gate")
    for bad, message in (("0,x", "comma-separated prices"), ("-1", ">= 0")):
        with pytest.raises(SystemExit) as stopped:
            bench.main(["--worlds", "3", "--variants", bad, "--output", "/nonexistent/never-written.json"])
        assert stopped.value.code == 2 and message in capsys.readouterr().err


def test_a_call_gate_starts_every_other_weight_as_without_it_and_trains_nothing_else(model_folder, tokenizer):
    """Adding ``call_gate`` leaves the composition as it was: the same initial weights (it draws no random number),
    the same every-token logits, and the same gradient on every other weight (its inputs are detached); its own
    loss is added to the training loss."""
    batch = inputs(tokenizer)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    models, grads, losses = {}, {}, {}
    parents = model_folder("qwen2", hidden=48), model_folder("llama", seed=1)  # built (drawing numbers) before seeding
    for with_gate in (False, True):
        torch.manual_seed(0)
        model = LLMModulesForCausalLM.compose(*parents, tokenizer=tokenizer, **{**DEFER, "mixture_gate": "confidence",
                                                                                "call_gate": with_gate}).train()
        output = model(**batch, labels=labels)
        output.loss.backward()
        models[with_gate], losses[with_gate] = model, output
        grads[with_gate] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    gate_weights = {n for n in grads[True] if "call_gate" in n}
    assert gate_weights == {"head.mixture.call_gate.weight", "head.mixture.call_gate.bias"}
    assert set(grads[True]) - gate_weights == set(grads[False])
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, rtol=0, atol=0)
    without = dict(models[False].named_parameters())
    for name, weight in models[True].named_parameters():
        if name not in gate_weights:
            assert torch.equal(weight, without[name]), name
    torch.testing.assert_close(losses[True].logits, losses[False].logits, rtol=0, atol=0)
    # at its zero start the call gate says 0.5 everywhere: its loss is log 2 per trained position, on top
    trained = (labels[:, 1:] != -100).sum()
    assert float(losses[True].source_call_cost.detach()[:, :-1][labels[:, 1:] != -100].sum() / trained) == pytest.approx(
        float(torch.log(torch.tensor(2.0))), rel=1e-5)
    assert float((losses[True].loss - losses[False].loss).detach()) == pytest.approx(float(torch.log(torch.tensor(2.0))), rel=1e-4)



def test_a_call_gate_leaves_the_fact_world_loops_training_of_every_other_weight_exact(model_folder, tokenizer):
    """Through the fact-world loop (``factworld/lm.train_loop``, the groups of ``training/optim.parameter_groups``),
    steps whose gradients are all clipped train every other weight exactly as without a call gate: its gradient is
    clipped on its own and nothing else reads it."""
    from llm_modules.evaluation.factworld.lm import train_loop
    from llm_modules.training.optim import parameter_groups

    batch = inputs(tokenizer)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    trained = {}
    parents = model_folder("qwen2", hidden=48), model_folder("llama", seed=1)  # built (drawing numbers) before seeding
    for with_gate in (False, True):
        torch.manual_seed(0)
        model = LLMModulesForCausalLM.compose(*parents, tokenizer=tokenizer, **{**DEFER, "mixture_gate": "confidence",
                                                                                "call_gate": with_gate}).train()
        groups = parameter_groups(model, {"connector": 1e-2, "target": 1e-2, "mixture": 1e-1})
        assert [g["group"] for g in groups][-1:] == (["call_gate"] if with_gate else ["mixture"])
        # the loss scaled up: every step's gradient norm is far above the loop's clip at 1
        train_loop(groups, lambda _: 1000 * model(**batch, labels=labels).loss, [0, 1], steps=3, batch_size=2,
                   warmup=1, progress=False)
        trained[with_gate] = {n: p.detach().clone() for n, p in model.named_parameters() if "call_gate" not in n}
    assert all(torch.equal(trained[True][name], weight) for name, weight in trained[False].items())

def test_a_call_gate_learns_where_the_mixture_changes_the_target_token(model_folder, tokenizer):
    """Trained through the model (its loss alone moves it), the call gate's score ranks the positions where the
    mixture's most likely token differs from the target's own above those where they agree."""
    model = compose(model_folder, tokenizer, **CALL_GATE)
    with torch.no_grad():
        model.head.mixture.call_gate.weight.zero_()
    batch = inputs(tokenizer, ["The quick brown fox jumps over the lazy dog", "A small model reads a large one"])
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    with torch.no_grad():
        output = model(**batch)
        target = model.target(**batch, output_hidden_states=True)
    changes = (output.logits.argmax(-1) != target.logits.argmax(-1))[batch.attention_mask.bool()]
    assert 0 < int(changes.sum()) < changes.numel()  # both kinds of position are there to learn
    optimizer = torch.optim.Adam(model.head.mixture.call_gate.parameters(), lr=5e-2)
    model.train()
    for _ in range(150):
        optimizer.zero_grad()
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
    scores = weights_seen(model.eval(), batch)[batch.attention_mask.bool()]
    assert scores[changes].min() > scores[~changes].max(), (scores[changes], scores[~changes])


def test_defer_gsm8k_rescores_stored_answers_strictly_and_leniently_without_a_model(tmp_path):
    """--rescore reads the stored texts again: strict exact match needs the stated answer; the flexible reading takes
    the last number of a reply the token limit cut off."""
    import json

    import defer_gsm8k as bench

    (tmp_path / "gsm8k").mkdir()
    questions = [{"question": "2 + 2?", "answer": "2 + 2 = 4\n#### 4"}, {"question": "3 * 3?", "answer": "#### 9"}]
    (tmp_path / "gsm8k" / "test.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    stored = {"0": {"text": "2 + 2 = 4\nThe answer is 4.", "new_tokens": 9, "seconds": 1.0},
              "1": {"text": "3 times 3 is 9, so the answer", "new_tokens": 256, "seconds": 2.0}}
    output = tmp_path / "defer-gsm8k.json"
    output.write_text(json.dumps({"rows": {"target_alone": stored}}))
    assert bench.main(["--rescore", "--output", str(output), "--gsm8k", str(tmp_path / "gsm8k")]) == 0
    result = json.loads(output.read_text())
    assert [r["correct"] for r in result["rows"]["target_alone"].values()] == [True, False]
    assert [r["flexible_correct"] for r in result["rows"]["target_alone"].values()] == [True, True]
    assert result["summary"]["target_alone"]["exact_match"] == 0.5
    assert result["summary"]["target_alone"]["flexible_match"] == 1.0
    missing = tmp_path / "none.json"
    assert bench.main(["--rescore", "--output", str(missing), "--gsm8k", str(tmp_path / "gsm8k")]) == 2
    assert not missing.exists()  # nothing written where nothing was stored
