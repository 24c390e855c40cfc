"""The fact world: disjoint splits, a source that really knows the facts, a leak probe that separates
a leaky model from a causal one, and a tiny end-to-end ``llm-modules compare`` run."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from llm_modules.cli import main
from llm_modules.evaluation.compare_config import config_from_mapping, load_compare_config
from llm_modules.errors import LLMModulesError
from llm_modules.evaluation.factworld.lm import build_world_tokenizer, encode_trace, logits_of
from llm_modules.evaluation.factworld.methods import Workbench, bridge_spec, build_model, method_from_mapping
from llm_modules.evaluation.factworld.metrics import leak_probe, parse_answer, source_recall, teacher_forced
from llm_modules.evaluation.factworld.models import pretrain_source, pretrain_target
from llm_modules.evaluation.factworld.world import FactWorld, background_traces, build_world, fact_sentence, trace_record


def _transfer_text(world: FactWorld) -> str:
    return "\n".join(json.dumps(trace_record(f, form)) for f in world.transfer for form in range(3))


@pytest.mark.parametrize("fraction", [0.125, 0.25, 0.5, 0.75])
def test_splits_are_disjoint_and_no_held_out_fact_occurs_in_transfer_data(fraction):
    world = build_world(entities=20, relations=8, transfer_fraction=fraction, seed=3)
    transfer = _transfer_text(world)
    keys = [{f.key for f in split} for split in (world.transfer, world.validation, world.test)]
    assert not (keys[0] & keys[1]) and not (keys[0] & keys[2]) and not (keys[1] & keys[2])
    assert sum(map(len, keys)) == len(world.facts) == 160
    for fact in world.validation + world.test:
        assert fact_sentence(fact) not in transfer
        assert f"{fact.entity}'s {fact.relation}" not in transfer
    # lesson (a) of the issue: every name the model must copy occurs in transfer data
    assert {f.entity for f in world.test} <= {f.entity for f in world.transfer}
    assert len(world.transfer) == round(fraction * 160)


def test_same_seed_gives_the_same_facts_for_every_transfer_fraction():
    a, b = build_world(entities=12, transfer_fraction=0.25, seed=1), build_world(entities=12, transfer_fraction=0.5, seed=1)
    assert a.facts == b.facts and a.transfer != b.transfer


def test_the_targets_pretraining_traces_hold_no_world_fact_and_no_fact_to_memorise():
    world = build_world(entities=12, relations=4, background_entities=4, seed=2)
    traces = background_traces(world, 400, seed=0)
    assert not {f.entity for f in traces} & set(world.entities)
    for entity in {f.entity for f in traces}:
        for relation in world.relations:
            values = {f.value for f in traces if f.entity == entity and f.relation == relation}
            assert len(values) > 1, f"{entity}'s {relation} is always {values}: the target could memorise it"


def test_impossible_fraction_is_an_error_that_says_what_to_do():
    with pytest.raises(ValueError, match="every entity needs one transfer fact"):
        build_world(entities=20, relations=4, transfer_fraction=0.1)


@pytest.fixture(scope="module")
def small_world():
    world = build_world(entities=8, relations=4, background_entities=4, transfer_fraction=0.25, seed=0)
    return world, build_world_tokenizer(world)


@pytest.fixture(scope="module")
def pretrained(small_world):
    world, tokenizer = small_world
    # 128 wide: at 64 wide the source often sits on the 'most common value per relation' plateau
    # (31% here) for hundreds of steps; at 128 it recalls every fact in 200-350 steps (seeds 0-3)
    source, run = pretrain_source(world, tokenizer, hidden=128, layers=2, heads=4, steps=800, lr=3e-3,
                                  eval_every=50, target_recall=1.0, progress=False)
    target, _ = pretrain_target(world, tokenizer, hidden=32, layers=1, heads=2, steps=60, progress=False)
    return Workbench(world, tokenizer, source, target), run


def test_the_source_really_knows_held_out_facts_at_the_traces_answer_point(pretrained):
    bench, run = pretrained
    recall = source_recall(bench.source, bench.tokenizer, bench.world, bench.world.test, "trace")
    assert recall >= 0.9, f"source recall on test facts {recall:.0%} after {run.steps_run} steps"
    assert run.validation and run.validation[-1][1] == pytest.approx(
        source_recall(bench.source, bench.tokenizer, bench.world, bench.world.facts, "trace"))
    # the target, pretrained on the world's language without its facts, does not know them
    assert source_recall(bench.target, bench.tokenizer, bench.world, bench.world.test, "trace") < 0.5


class PeekNextToken(nn.Module):
    """A deliberately leaky 'model': its prediction at position t is the input token at t + 1."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size

    def fact_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        following = torch.roll(input_ids, -1, dims=1)
        return nn.functional.one_hot(following, self.vocab_size).float()


def test_leak_probe_collapses_for_a_leaky_model_and_equals_teacher_forcing_for_causal_ones(pretrained):
    bench, _ = pretrained
    tokenizer, vocab = bench.tokenizer, len(bench.tokenizer)
    examples = [encode_trace(tokenizer, bench.world, f) for f in bench.world.test]
    pad = tokenizer.pad_token_id

    peek = PeekNextToken(vocab)
    assert all(teacher_forced(peek, examples, pad))
    peek_right, peek_shift = leak_probe(peek, examples, pad, vocab)
    assert sum(peek_right) <= 0.1 * len(examples) and min(peek_shift) > 0.5  # one-hot logits: a shift of 1

    for model in (bench.source, build_model(bridge_spec(leaky=False, target_init="pretrained"), bench, seed=0)):
        plain = teacher_forced(model, examples, pad)
        right, shift = leak_probe(model, examples, pad, vocab)
        assert right == plain and max(shift) < 1e-4

    # the composed model with the released padding-only mask reads future source states: scrambling moves logits
    leaky = build_model(bridge_spec(leaky=True, target_init="pretrained"), bench, seed=0)
    ids = torch.tensor([examples[0].input_ids])
    scrambled = ids.clone()
    k = examples[0].answer[0]
    scrambled[0, k:] = torch.randint(0, vocab, (ids.shape[1] - k,), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    assert not torch.allclose(logits_of(leaky, ids, mask)[0, :k], logits_of(leaky, scrambled, mask)[0, :k])


def test_method_names_and_bad_method_options_are_clear_errors():
    assert bridge_spec(leaky=True, target_init="random").name == "llm_modules_bridge_leaky_random"
    assert method_from_mapping({"kind": "bridge", "head": "source", "target_init": "pretrained"}).name == (
        "llm_modules_bridge_causal_pretrained_head_source")
    with pytest.raises(LLMModulesError, match="unknown method 'target_fine'"):
        method_from_mapping("target_fine")
    with pytest.raises(LLMModulesError, match="unknown bridge option"):
        method_from_mapping({"kind": "bridge", "gates": "tanh"})
    with pytest.raises(LLMModulesError, match="did you mean steps"):
        config_from_mapping({"budget": {"step": 3}})


def test_parse_answer_reads_the_solution_block():
    assert parse_answer("<|begin_of_thought|> x <|end_of_thought|> <|begin_of_solution|> Quist <|end_of_solution|>") == "Quist"
    assert parse_answer("no solution here") is None


TINY_COMPARE = """\
output: {output}
seeds: [0]
world: {{entities: 8, relations: 4, background_entities: 4, transfer_fraction: 0.25}}
source: {{hidden: 64, layers: 2, heads: 4, steps: 300, lr: 0.005, eval_every: 50}}
target: {{hidden: 32, layers: 1, heads: 2, steps: 30}}
budget: {{steps: 20, batch_size: 8, eval_every: 10, validation_facts: 8}}
methods:
  - target_alone
  - source_alone
  - source_head
  - distill_kd
  - llm_modules_bridge_leaky_random
  - {{kind: bridge, target_init: pretrained, head: source_mix, connector_layers: 1}}
sweep_fractions: [0.25, 0.5]
sweep_methods: [source_head]
workers: 1
"""


def test_tiny_compare_run_writes_report_plots_and_results_json(tmp_path, capsys, monkeypatch):
    import llm_modules.evaluation.compare as compare_module

    trained: list[str] = []
    run_method = compare_module.run_method
    monkeypatch.setattr(compare_module, "run_method", lambda spec, *a, **k: trained.append(spec.name) or run_method(spec, *a, **k))
    config_path = tmp_path / "compare.yaml"
    config_path.write_text(TINY_COMPARE.format(output=tmp_path / "out"))
    assert load_compare_config(config_path).methods[-1].name == "llm_modules_bridge_causal_pretrained_head_source_mix_layers1"
    assert main(["compare", "--config", str(config_path), "--quiet"]) == 0
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    assert 0 < results["chance"] < 1
    names = ["target_alone", "source_alone", "source_head", "distill_kd", "llm_modules_bridge_leaky_random",
             "llm_modules_bridge_causal_pretrained_head_source_mix_layers1"]
    assert list(results["methods"]) == names
    for name in names:
        entry = results["methods"][name]
        for key in ("test_accuracy", "leak_probe_accuracy", "teacher_forced_accuracy", "format_adherence"):
            assert len(entry[key]) == 1 and 0 <= entry[key][0] <= 1, (name, key)
        assert entry["inference_params"] > 0 and entry["seconds"] > 0
    assert results["methods"]["target_alone"]["trainable_params"] == 0
    assert results["methods"]["source_head"]["trainable_params"] > 0
    assert set(results["sweep"]["0.5"]) == {"source_head", "source_head/unseen"}
    # the sweep reuses the main runs at the main transfer fraction (the same world) instead of training again
    assert results["sweep"]["0.25"]["source_head"] == results["methods"]["source_head"]["test_accuracy"]
    assert trained.count("source_head") == 2
    report = (out / "report.md").read_text()
    assert "| llm_modules_bridge_leaky_random |" in report
    for plot in ("accuracy.png", "training-curves.png", "gates.png", "cross-attention.png", "sweep.png"):
        assert (out / plot).stat().st_size > 1000, plot
    assert "llm_modules_bridge_leaky_random" in capsys.readouterr().out


def test_compare_with_a_bad_config_exits_2_with_the_file_and_key(tmp_path, capsys):
    config_path = tmp_path / "compare.yaml"
    config_path.write_text("world: {entitys: 3}\n")
    assert main(["compare", "--config", str(config_path)]) == 2
    assert "entitys" in capsys.readouterr().err


def test_sweep_table_reads_a_fraction_without_unseen_answers_as_n_a():
    from llm_modules.evaluation.report import _sweep_table

    table = _sweep_table({"0.75": {"m": [0.5, 0.7], "m/unseen": [float("nan"), None]}})
    assert "| m | 60% ± 14% (n/a unseen) |" in table
