"""The composition world: each parent holds half of what an answer needs, the splits keep every test fact out of
the transfer data, the texts put the fact and the skill where the metrics look, and the harness runs every job
on one thread so that a number does not depend on how many threads or workers computed it."""

from __future__ import annotations

import json
import re

import pytest
import torch

from llm_modules.errors import LLMModulesError
from llm_modules.evaluation.compare_config import config_from_mapping
from llm_modules.evaluation.factworld.composition import NUMBERS, build_composition_world
from llm_modules.evaluation.factworld.lm import build_world_tokenizer, encode_trace, train_loop
from llm_modules.evaluation.factworld.methods import (
    MethodSpec,
    Workbench,
    bridge_spec,
    fusion_spec,
    build_model,
    default_methods,
    method_from_mapping,
)
from llm_modules.evaluation.factworld.models import pretrain_target
from llm_modules.evaluation.factworld.pool import run_jobs
from llm_modules.evaluation.factworld.world import build_world, fact_sentence
from llm_modules.tiny import tiny_model


@pytest.fixture(scope="module")
def world():
    return build_composition_world(entities=12, relations=4, background_entities=4, seed=1)


@pytest.fixture(scope="module")
def tokenizer(world):
    return build_world_tokenizer(world)


def test_the_cipher_maps_every_number_to_another_and_questions_need_both_parents(world):
    assert sorted(world.cipher) == sorted(world.cipher.values()) == sorted(NUMBERS)
    assert all(number != cipher for number, cipher in world.cipher.items())  # recalling the fact is never the answer
    fact = world.test[0]
    record = world.trace_record(fact)
    asked, reply = record["conversations"][0]["value"], record["conversations"][1]["value"]
    assert fact.entity in asked and fact.value not in asked  # the question names the entity, not the value
    assert f"{fact_sentence(fact)} The cipher of {fact.value} is {world.cipher[fact.value]}." in reply
    assert world.final_answer(fact) == world.cipher[fact.value] and world.chance == pytest.approx(0.01)


def test_the_source_never_sees_a_cipher_and_the_target_never_sees_a_world_fact(world):
    documents = " ".join(world.source_documents(repeats=4))
    assert "cipher of" in documents  # it hears the question...
    assert not re.search(r"cipher of \d \d is", documents)  # ...never a cipher
    traces = world.background_traces(300, seed=0)
    assert not {f.entity for f in traces} & set(world.entities)
    assert world.target_sentence(traces[0]) == f"The cipher of {traces[0].value} is {world.cipher[traces[0].value]}."


def test_answer_seen_means_the_final_answer_occurs_in_the_transfer_data(world):
    transfer = "\n".join(json.dumps(world.trace_record(f, form)) for f in world.transfer for form in range(3))
    numbers = set(re.findall(r"(?<!\d)(?<!\d )\d \d(?! ?\d)", transfer))
    seen = [world.answer_seen(f) for f in world.test]
    assert any(seen) and not all(seen)
    for fact, was_seen in zip(world.test, seen):
        assert was_seen == (world.final_answer(fact) in numbers)
        assert fact_sentence(fact) not in transfer  # held-out facts stay out of the transfer data
    assert {f.entity for f in world.test} <= {f.entity for f in world.transfer}


def test_numbers_are_one_token_per_digit_and_the_spans_sit_on_the_fact_and_the_cipher(world, tokenizer):
    for fact in world.test[:5]:
        example = encode_trace(tokenizer, world, fact, form=2)
        decode = lambda positions: tokenizer.decode([example.input_ids[k] for k in positions])  # noqa: E731
        assert decode(example.answer) == f" {fact.value}" and len(example.answer) == 2
        assert decode(example.skill) == f" {world.cipher[fact.value]}" and len(example.skill) == 2
        assert example.knowledge == example.answer + example.skill
        assert decode(example.statement) == f" {fact_sentence(fact)[:-1]}"  # the name copied from the question on
        given = tokenizer.decode(example.input_ids[example.prompt_length: example.fact_end])
        assert given.endswith(fact_sentence(fact)) and world.cipher[fact.value] not in given


def test_the_facts_world_keeps_its_texts_and_has_no_skill_span():
    world = build_world(entities=8, relations=4, background_entities=4, seed=0)
    tokenizer = build_world_tokenizer(world)
    example = encode_trace(tokenizer, world, world.test[0])
    assert tokenizer.decode([example.input_ids[k] for k in example.answer]) == f" {world.test[0].value}"
    assert example.skill == [] and world.final_answer(world.test[0]) == world.test[0].value


def test_composition_config_defaults_to_both_parents_both_skylines_and_the_papers_rows():
    config = config_from_mapping({"world": {"kind": "composition"}})
    names = [m.name for m in config.methods]
    assert names == [m.name for m in default_methods("composition")]
    for row in ("source_alone", "target_alone", "skyline_source_recalls_fact", "skyline_target_given_fact",
                "target_finetuned", "source_finetuned", "distill_kd", "llm_modules_bridge_leaky_random",
                "llm_modules_bridge_causal_pretrained_head_source_pointer"):
        assert row in names
    with pytest.raises(LLMModulesError, match="world.kind 'compose' is not one of facts, composition"):
        config_from_mapping({"world": {"kind": "compose"}})


def test_harness_options_name_the_row_and_bad_values_are_errors():
    spec = bridge_spec(target_init="pretrained", head="source_pointer", train_target="none", head_init="target")
    assert spec.name == "llm_modules_bridge_causal_pretrained_head_source_pointer_frozen_target_head_init_target"
    assert method_from_mapping({"kind": "bridge", "target_init": "pretrained", "head": "source_pointer",
                                "train_target": "none", "head_init": "target"}) == spec
    with pytest.raises(LLMModulesError, match="train_target='some'"):
        bridge_spec(train_target="some")
    with pytest.raises(LLMModulesError, match="only apply to kind: bridge, fusion or semalign"):
        MethodSpec("x", "target_finetuned", {"head": "new"})
    fusion = method_from_mapping({"kind": "fusion", "memory": "prompt"})
    assert fusion == fusion_spec(memory="prompt") and fusion.name == "llm_modules_fusion_prompt"


def test_frozen_target_keeps_its_weights_and_the_head_starts_as_the_targets_own(world, tokenizer):
    source = tiny_model("qwen2", tokenizer, hidden=32, layers=1)
    target = tiny_model("llama", tokenizer, hidden=32, layers=1)
    bench = Workbench(world, tokenizer, source, target)
    spec = bridge_spec(target_init="pretrained", head="source_pointer", train_target="none", head_init="target")
    model = build_model(spec, bench, seed=0)
    assert not any(p.requires_grad for p in model.target.parameters())
    assert torch.equal(model.get_output_embeddings().weight, target.get_output_embeddings().weight)
    assert model.get_output_embeddings().weight.requires_grad and model.connector.pre_proj.weight.requires_grad
    with pytest.raises(LLMModulesError, match="head_init='target' needs a new head"):
        build_model(bridge_spec(target_init="pretrained", head="source", head_init="target"), bench, seed=0)


def test_of_equal_validation_scores_the_later_checkpoint_is_kept():
    weight = torch.nn.Parameter(torch.zeros(1))
    module = torch.nn.Module()
    module.weight = weight
    scores = iter([0.5, 1.0, 1.0, 0.9, 0.9])
    result = train_loop([weight], lambda batch: (weight - 10).pow(2).sum(), [None] * 4, steps=50, batch_size=2,
                        evaluate=lambda: next(scores), eval_every=10, patience=2, module=module, progress=False)
    # 1.0 at steps 20 and 30: the later is kept; a tie is no improvement, so with a worse one it ends patience 2
    assert result.best_step == 30 and result.steps_run == 40


def _tiny_target(world, tokenizer) -> tuple[float, float]:
    model, run = pretrain_target(world, tokenizer, family="llama", hidden=32, layers=1, heads=2, steps=6,
                                 batch_size=4, progress=False)
    return run.losses[-1], float(sum(p.double().sum() for p in model.parameters()))


def test_a_job_gives_the_same_numbers_inline_and_in_two_worker_processes(world, tokenizer):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # what the user's environment might say; run_jobs runs every job on one thread
    try:
        inline = run_jobs(_tiny_target, [(world, tokenizer)], workers=1)
        assert torch.get_num_threads() == 2  # restored afterwards
    finally:
        torch.set_num_threads(threads)
    pooled = run_jobs(_tiny_target, [(world, tokenizer)] * 2, workers=2)
    assert inline[0] == pooled[0] == pooled[1]  # bit for bit


def test_target_pretraining_stops_once_it_has_the_skill_and_the_probe_covers_every_number(world, tokenizer):
    probe = world.skill_probe()
    assert sorted(f.value for f in probe) == sorted(NUMBERS)
    assert not {f.entity for f in probe} & set(world.entities)  # background entities: no world fact is asked
    _, stopped = pretrain_target(world, tokenizer, family="llama", hidden=16, layers=1, heads=2, steps=12,
                                 batch_size=4, target_skill=0.0, eval_every=4, progress=False)
    assert stopped.steps_run == 4  # the first check already meets a skill of 0
    _, full = pretrain_target(world, tokenizer, family="llama", hidden=16, layers=1, heads=2, steps=12,
                              batch_size=4, target_skill=None, eval_every=4, progress=False)
    assert full.steps_run == 12


TINY_COMPOSITION = """\
output: {output}
seeds: [0, 1]
world: {{kind: composition, entities: 6, relations: 4, background_entities: 4}}
source: {{family: llama, hidden: 32, layers: 2, heads: 2, steps: 20, eval_every: 10}}
target: {{family: llama, hidden: 32, layers: 1, heads: 2, steps: 20, target_skill: 1.0, eval_every: 10}}
budget: {{steps: 6, batch_size: 4, eval_every: 3, validation_facts: 4}}
methods:
  - source_alone
  - target_alone
  - skyline_target_given_fact
  - {{kind: fusion, memory: sequence, head: source_mix}}
  - {{kind: fusion, memory: prompt}}
workers: 1
"""


def test_tiny_composition_compare_reports_every_row_over_seeds_with_fusion_gates(tmp_path, capsys):
    from llm_modules.cli import main

    config_path = tmp_path / "compare.yaml"
    config_path.write_text(TINY_COMPOSITION.format(output=tmp_path / "out"))
    assert main(["compare", "--config", str(config_path), "--quiet"]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert list(results["methods"]) == ["source_alone", "target_alone", "skyline_target_given_fact",
                                        "llm_modules_fusion_sequence_head_source_mix", "llm_modules_fusion_prompt"]
    for entry in results["methods"].values():
        assert len(entry["test_accuracy"]) == 2  # one per seed
    assert results["chance"] == pytest.approx(0.01)
    target = results["pretraining"]["target"]
    assert target["steps"] == 20 and 0.0 <= target["skill"] < 1.0  # 20 steps teach no cipher: it trained them all
    assert "WARNING: the target answers only" in capsys.readouterr().err  # and the user is told
    report = (tmp_path / "out" / "report.md").read_text()
    assert "± is the standard deviation over seeds" in report and "| llm_modules_fusion_prompt |" in report
    assert (tmp_path / "out" / "gates.png").stat().st_size > 1000  # the fusion rows' gates, read in their workers


def test_a_world_too_small_for_its_transfer_fraction_exits_2_naming_the_setting(tmp_path, capsys):
    from llm_modules.cli import main

    config_path = tmp_path / "compare.yaml"
    config_path.write_text("world: {kind: composition, entities: 6, relations: 2}\n")
    assert main(["compare", "--config", str(config_path), "--quiet"]) == 2
    assert "every entity needs one transfer fact" in capsys.readouterr().err
