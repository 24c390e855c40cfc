"""Training on tiny models: exact resume, cached = uncached, stale caches refused, groups, accumulation, config."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from llm_modules import LLMModulesError, LLMModulesForCausalLM
from llm_modules.training.cache import StaleCacheError
from llm_modules.tiny import save_tiny, tiny_model
from llm_modules.model.loss import causal_lm_loss, composed_lm_loss, next_token_mask
from llm_modules.model.masks import positions_from_padding
from llm_modules.training.padding import pad_rows
from llm_modules.training.command import train_main
from llm_modules.training.trainer import token_mean_loss, train
from llm_modules.training.config import TrainConfig, config_from_argv, load_config

from conftest import losses


class Interrupt(TrainerCallback):
    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at_step:
            raise KeyboardInterrupt


def test_resume_after_interruption_continues_exactly(config, tmp_path):
    whole = train(config(output=str(tmp_path / "whole")))
    interrupted = config(output=str(tmp_path / "cut"))
    with pytest.raises(KeyboardInterrupt):
        train(interrupted, callbacks=[Interrupt(at_step=5)])  # checkpoint-3 exists, steps 4-5 are lost
    assert (tmp_path / "cut" / "checkpoint-3").is_dir() and not (tmp_path / "cut" / "checkpoint-6").exists()
    resumed = train(config(output=str(tmp_path / "cut"), resume="auto"))
    assert set(losses(resumed)) >= {4, 5, 6}
    for step in (4, 5, 6):  # dropout is on (0.1): RNG state, data order and optimizer state all come back
        assert losses(resumed)[step] == pytest.approx(losses(whole)[step], abs=1e-6)
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_checkpoints_hold_trainable_weights_and_optimizer_state_only(config, tmp_path):
    result = train(config(max_steps=3))
    checkpoint = tmp_path / "run" / "checkpoint-3"
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= {p.name for p in checkpoint.iterdir()}
    saved = load_file(checkpoint / "model.safetensors")
    assert set(saved) == set(result.model.trainable_state_dict())
    assert not any(name.startswith("source.") for name in saved)


def test_cached_training_gives_the_same_loss_curve_without_loading_the_source(config, tmp_path):
    plain = train(config(output=str(tmp_path / "plain"), validation=0.2, eval_steps=3))
    cached = train(config(output=str(tmp_path / "cached"), validation=0.2, eval_steps=3,
                          cache=str(tmp_path / "cache"), cache_dtype="float32"))
    assert cached.model.source is None and plain.model.source is not None
    assert losses(cached).keys() == losses(plain).keys() and len(losses(plain)) == 6
    for step, value in losses(plain).items():
        assert losses(cached)[step] == pytest.approx(value, abs=1e-5)
    assert cached.metrics["eval_loss"] == pytest.approx(plain.metrics["eval_loss"], abs=1e-5)
    results = json.loads((tmp_path / "cached" / "train_results.json").read_text())
    assert results["cache"]["computed"] == 24 and results["source_loaded"] is False
    # A second run reuses every row and computes nothing; fp16 storage stays close to the fp32 curve.
    again = train(config(output=str(tmp_path / "again"), validation=0.2, eval_steps=3, cache=str(tmp_path / "cache"),
                         cache_dtype="float32"))
    assert json.loads((tmp_path / "again" / "train_results.json").read_text())["cache"]["computed"] == 0
    assert losses(again) == losses(cached)
    half = train(config(output=str(tmp_path / "half"), validation=0.2, eval_steps=3, cache="auto"))
    for step, value in losses(plain).items():
        assert losses(half)[step] == pytest.approx(value, abs=2e-3)
    # The model trained without its source is saved naming the source, and reloads with it to generate.
    model = LLMModulesForCausalLM.from_pretrained(tmp_path / "cached")
    assert model.source is not None
    ids = model.tokenizer("What is 2 + 2?", return_tensors="pt")
    assert model.generate(**ids, max_new_tokens=3, do_sample=False).shape[1] == ids.input_ids.shape[1] + 3


def test_stale_cache_is_refused_with_the_differing_field(config, tmp_path, tokenizer):
    cache = str(tmp_path / "cache")
    train(config(max_steps=1, cache=cache))
    with pytest.raises(StaleCacheError, match=r"source_layer: cache has -1, this run has -2.*another cache folder"):
        train(config(max_steps=1, cache=cache, source_layer=-2))
    with pytest.raises(StaleCacheError, match=r"template: cache has 'chat', this run has 'plain'"):
        train(config(max_steps=1, cache=cache, template="plain"))
    with pytest.raises(StaleCacheError, match=r"dtype: cache has 'float16'"):
        train(config(max_steps=1, cache=cache, cache_dtype="bfloat16"))
    # Same folder, other weights (the source was re-saved): refused too.
    source = tmp_path / "source"
    save_tiny(tiny_model("qwen2", tokenizer, seed=0, hidden=48), tokenizer, source)
    train(config(max_steps=1, cache=str(tmp_path / "c2"), source=str(source)))
    save_tiny(tiny_model("qwen2", tokenizer, seed=1, hidden=48), tokenizer, source)
    with pytest.raises(StaleCacheError, match="source_weights"):
        train(config(max_steps=1, cache=str(tmp_path / "c2"), source=str(source)))
    # rebuild_cache recomputes it instead.
    train(config(max_steps=1, cache=str(tmp_path / "c2"), source=str(source), rebuild_cache=True))


def test_optimizer_has_named_groups_with_their_learning_rates(config):
    result = train(config(max_steps=1, scheduler="constant"))
    groups = result.trainer.optimizer.param_groups
    by_name = {g["group"]: g["lr"] for g in groups}
    assert by_name == {"connector": 1e-4, "target": 5e-5}
    seen = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in result.model.parameters() if p.requires_grad]
    assert sorted(seen) == sorted(trainable) and len(seen) == len(set(seen))


def test_the_demos_best_row_trains_on_trainer_with_its_mixture_gate_and_learning_rate(config, model_folder):
    """fusion, no cross-attention block, a source_mix head with a confidence gate and the gate's own learning rate:
    what the fact-world harness trains, through the run config (issue 24)."""
    run = config(topology="fusion", target=model_folder("llama", seed=1), memory="sequence", head="source_mix",
                 mixture_gate="confidence", fusion_layers=[], lr_mixture=3e-2, max_steps=1, scheduler="constant")
    result = train(run)
    assert len(result.model.fusion.blocks) == 0 and result.model.config.mixture_gate == "confidence"
    groups = result.trainer.optimizer.param_groups  # (with and without weight decay)
    assert {(g["group"], g["lr"]) for g in groups} == {("mixture", 3e-2)}
    trained = {id(p) for name, p in result.model.named_parameters() if p.requires_grad}
    assert trained and all(name.startswith("head.mixture.") for name, p in result.model.named_parameters() if p.requires_grad)
    assert {id(p) for g in groups for p in g["params"]} == trained
    saved = LLMModulesForCausalLM.from_pretrained(result.output)
    assert saved.config.mixture_gate == "confidence" and saved.config.fusion_layers == []


def test_a_deferring_model_trains_with_its_call_price_and_defers_as_saved(config, model_folder, tmp_path):
    """The deferral row of benchmarks/defer_worlds.py through ``llm-modules train``: a target-only gate trained with a
    price per source call (the first step's loss is higher by price x the mean source weight, in (0.05, 0.95) x
    price), and the saved model carries its price and η and defers in ``generate()`` with no extra argument."""
    first = {}
    for price in (0.0, 1.0):
        run = config(topology="fusion", target=model_folder("llama", seed=1), memory="sequence", head="source_mix",
                     mixture_gate="target_confidence", fusion_layers=[], lr_mixture=3e-2, max_steps=1,
                     scheduler="constant", source_call_price=price, defer_threshold=0.5,
                     output=str(tmp_path / f"price-{price:g}"))
        result = train(run)
        first[price] = losses(result)[1]
    assert 0.05 < first[1.0] - first[0.0] < 0.95
    saved = LLMModulesForCausalLM.from_pretrained(result.output)
    assert (saved.config.source_call_price, saved.config.defer_threshold) == (1.0, 0.5)
    ids = torch.tensor([[5, 6, 7, 8]])
    saved.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert saved.last_deferral is not None and saved.last_deferral.report()[0]["positions"] == 4


def test_a_call_gate_trains_through_train_and_the_saved_model_defers_on_it(config, model_folder, tmp_path):
    """``call_gate: true`` beside the demo's mixture gate (which reads the source too) through ``llm-modules train``:
    the first step's loss carries the call gate's log 2 at its zero start, its weights move and are saved, and the
    saved model defers in ``generate()`` on it with no extra argument."""
    first, trained = {}, {}
    for with_gate in (False, True):  # a small max_grad_norm: every step is clipped
        run = config(topology="fusion", target=model_folder("llama", seed=1), memory="sequence", head="source_mix",
                     mixture_gate="confidence", fusion_layers=[], lr_mixture=3e-2, max_steps=2, scheduler="constant",
                     call_gate=with_gate, defer_threshold=0.5 if with_gate else None, max_grad_norm=0.01,
                     attention_dropout=0.0, output=str(tmp_path / f"call-gate-{with_gate}"))
        result = train(run)
        first[with_gate] = losses(result)[1]
        trained[with_gate] = result.model.trainable_state_dict()
    assert first[True] - first[False] == pytest.approx(0.6931, abs=1e-3)
    # its gradient is clipped on its own: every other weight trains exactly as without it
    assert set(trained[True]) - set(trained[False]) == {"head.mixture.call_gate.weight", "head.mixture.call_gate.bias"}
    assert all(torch.equal(trained[False][name], trained[True][name]) for name in trained[False])
    saved = LLMModulesForCausalLM.from_pretrained(result.output)
    assert saved.config.call_gate and saved.config.defer_threshold == 0.5
    assert saved.head.mixture.call_gate.weight.abs().sum() > 0  # trained, and saved
    ids = torch.tensor([[5, 6, 7, 8]])
    saved.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert saved.last_deferral is not None and saved.last_deferral.report()[0]["positions"] == 4


def test_a_call_gate_gradient_is_clipped_alone_and_the_models_norm_is_its_own():
    from llm_modules.training.optim import clip_gradients

    weight, gate = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    weight.grad, gate.grad = torch.tensor([3.0, 0.0, 4.0]), torch.tensor([100.0, 0.0])
    norm = clip_gradients([{"params": [weight], "group": "target"}, {"params": [gate], "group": "call_gate"}], 1.0)
    assert float(norm) == pytest.approx(5.0)  # the model's own gradient norm, without the gate's
    torch.testing.assert_close(weight.grad, torch.tensor([0.6, 0.0, 0.8]))  # scaled by its own norm only
    torch.testing.assert_close(gate.grad, torch.tensor([1.0, 0.0]))


def test_gradient_accumulation_matches_one_big_batch(config, tmp_path):
    big = train(config(output=str(tmp_path / "big"), batch_size=4, grad_accum=1, max_steps=2, attention_dropout=0.0))
    small = train(config(output=str(tmp_path / "small"), batch_size=2, grad_accum=2, max_steps=2, attention_dropout=0.0))
    assert losses(small)[2] == pytest.approx(losses(big)[2], abs=1e-5)
    a, b = big.model.trainable_state_dict(), small.model.trainable_state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_early_stopping_stops_when_validation_loss_stalls(config):
    result = train(config(lr_connector=0.0, lr_target=0.0, validation=0.2, eval_steps=1, early_stopping_patience=1, max_steps=10))
    assert result.trainer.state.global_step == 2  # step 1 sets the best, step 2 does not improve


def test_cli_trains_from_yaml_with_overrides_and_writes_reports(config, tmp_path, capsys):
    base = config()
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(
        "# llm-modules train --config run.yaml\n"
        f"source: {base.source}\ntarget: {base.target}\ndata: {base.data}\noutput: {tmp_path / 'cli'}\n"
        "heads: 4\nadapter_dim: 16\nlr_connector: 1e-4\nmax_steps: 2\nreport_to: none\nprogress: false\n"
    )
    assert train_main(["--config", str(yaml_file), "--max-steps", "3", "--batch_size=2", "--validation", "0.25"]) == 0
    out = tmp_path / "cli"
    results = json.loads((out / "train_results.json").read_text())
    assert results["steps"] == 3 and results["data"]["train"] == 18 and results["data"]["validation"] == 6
    assert (out / "loss_curve.png").stat().st_size > 1000 and (out / "train_config.yaml").exists()
    printed = capsys.readouterr().out  # Trainer's log lines, then our JSON summary
    assert json.loads(printed[printed.rindex('{\n  "output"'):])["output"] == str(out)


def test_run_config_types_overrides_and_unknown_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr_connector: 1e-4\nepochs: 3\ngradient_checkpointing: yes\nreport_to: [tensorboard]\n")
    loaded = load_config(path)
    assert loaded.lr_connector == 1e-4 and isinstance(loaded.lr_connector, float) and loaded.epochs == 3.0
    assert loaded.gradient_checkpointing is True and loaded.report_to == ["tensorboard"]
    merged = config_from_argv(["--config", str(path), "--lr", "3e-4", "--lr-target", "1e-5", "--leaky",
                               "--intermediate-dim", "none", "--report-to", "none"])
    assert (merged.lr_connector, merged.lr_target, merged.leaky) == (3e-4, 1e-5, True)
    assert merged.intermediate_dim is None and merged.report_to == ["none"] and merged.epochs == 3.0
    with pytest.raises(LLMModulesError, match="unknown option 'learning_rate_target'.*did you mean lr_target"):
        config_from_argv(["--learning-rate-target", "1"])
    path.write_text("max_lenght: 10\n")
    with pytest.raises(LLMModulesError, match=rf"{path}: unknown option 'max_lenght'; did you mean max_length"):
        load_config(path)
    with pytest.raises(LLMModulesError, match="option batch_size: expected int, got 'two'"):
        config_from_argv(["--batch-size", "two"])
    with pytest.raises(LLMModulesError, match="missing option"):
        train(TrainConfig(source="x"))


def test_trainer_loss_adds_a_mixture_heads_own_cross_entropy_and_weighs_every_token_once():
    generator = torch.Generator().manual_seed(0)
    logits, head_logits = torch.randn(2, 6, 11, generator=generator), torch.randn(2, 6, 11, generator=generator)
    labels = torch.randint(0, 11, (2, 6), generator=generator)
    labels[0, :3] = -100
    plain = token_mean_loss({"logits": logits}, labels)
    torch.testing.assert_close(plain, causal_lm_loss(logits, labels))
    mixed = token_mean_loss({"logits": logits, "head_logits": head_logits}, labels)
    torch.testing.assert_close(mixed, plain + causal_lm_loss(head_logits, labels))
    # with the accumulated batch's token count, a sum over that count
    count = int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(token_mean_loss({"logits": logits}, labels, num_items_in_batch=2 * count), plain / 2)
    # without a count, each term is exactly the plain loop's mean (the fact world adds the two means)
    no_count = composed_lm_loss(logits, head_logits, labels)
    assert torch.equal(no_count, causal_lm_loss(logits, labels) + causal_lm_loss(head_logits, labels))
    assert next_token_mask(labels).sum() == count
    # a price per source call: its cost at each trained prediction, over the same count (the last position and
    # the ignored ones carry none)
    cost = torch.rand(2, 6, generator=generator)
    priced = token_mean_loss({"logits": logits, "source_call_cost": cost}, labels, num_items_in_batch=count)
    torch.testing.assert_close(priced, plain + cost[:, :-1][labels[:, 1:] != -100].sum() / count)


def test_one_padding_rule_pads_right_or_left():
    rows = [[5, 6, 7], [8]]
    ids, mask = pad_rows(rows, 0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = pad_rows(rows, -100, left=True, length=4)
    assert ids.tolist() == [[-100, 5, 6, 7], [-100, -100, -100, 8]] and mask.tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    assert positions_from_padding(mask).tolist() == [[0, 0, 1, 2], [0, 0, 0, 0]]
