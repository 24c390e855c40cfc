"""``llm-modules demo --export DIR``: the demo's parents, data and best row as files ``llm-modules train`` and
``llm-modules eval`` read; the exported data tokenizes to exactly the sequences the demo trains and scores on, and
``train.yaml`` holds the row's own options."""

from __future__ import annotations

import json

import pytest
import yaml

from llm_modules.cli import main
from llm_modules.errors import LLMModulesError
from llm_modules.evaluation.factworld.composition import build_composition_world
from llm_modules.evaluation.factworld.export import check_export_folder, choose_row, export_demo, exportable
from llm_modules.evaluation.factworld.lm import build_world_tokenizer, encode_trace
from llm_modules.evaluation.factworld.methods import Budget, Workbench, bridge_spec, composed_options, fusion_spec
from llm_modules.evaluation.factworld.methods import MethodSpec
from llm_modules.model.configuration import ComposeOptions
from llm_modules.model.loading import load_tokenizer
from llm_modules.tiny import tiny_model
from llm_modules.training.config import load_config, validate
from llm_modules.training.data import DataOptions, Renderer, build_examples, read_records, to_messages

ROW = fusion_spec(memory="sequence", head="source_mix", fusion_layers=[], mixture_gate="confidence")
BUDGET = Budget(steps=6, batch_size=4, lr=5e-4, target_lr=5e-4, mixture_lr=3e-2, eval_every=3, validation_facts=3)


@pytest.fixture(scope="module")
def bench():
    world = build_composition_world(entities=6, relations=4, background_entities=4, seed=1)
    tokenizer = build_world_tokenizer(world)
    source = tiny_model("llama", tokenizer, seed=0, hidden=32, heads=2)
    target = tiny_model("llama", tokenizer, seed=1, hidden=32, layers=1, heads=2)
    return Workbench(world, tokenizer, source, target)


def results_of(**accuracies: list[float]) -> dict:
    """Results with these test accuracies per seed (validation: the same unless ``choose_row``'s test sets it)."""
    return {"methods": {name: {"test_accuracy": values, "validation_accuracy": values}
                        for name, values in accuracies.items()}}


@pytest.fixture(scope="module")
def exported(bench, tmp_path_factory):
    folder = tmp_path_factory.mktemp("export") / "demo-export"
    methods = [MethodSpec("target_alone", "target_alone"), bridge_spec(), ROW]
    results = results_of(target_alone=[0.9, 0.9], llm_modules_bridge_causal_random=[0.1, 0.2], **{ROW.name: [0.5, 0.7]})
    return export_demo(bench, methods, BUDGET, [3, 4], results, folder)


def test_the_export_holds_both_parents_every_split_and_the_rows_scores(exported, bench):
    folder = exported.parent
    for role in ("source", "target"):
        assert (folder / role / "config.json").is_file() and (folder / role / "tokenizer.json").is_file()
    world = bench.world
    rows = {name: (folder / f"{name}.jsonl").read_text().splitlines()
            for name in ("train", "validation", "test", "test_seen", "test_unseen")}
    assert len(rows["train"]) == len(world.transfer) * world.question_forms  # every form, as the demo trains
    assert len(rows["validation"]) == min(len(world.validation), BUDGET.validation_facts)
    assert len(rows["test"]) == len(world.test) == len(rows["test_seen"]) + len(rows["test_unseen"])
    assert {json.loads(r)["fact"]["entity"] for r in rows["test"]} <= set(world.entities)
    row = json.loads((folder / "demo_row.json").read_text())  # the best composed row, not the best row
    assert row["method"] == ROW.name and row["seeds"] == [3, 4] and row["mean_test_accuracy"] == pytest.approx(0.6)


def test_train_yaml_loads_through_train_config_with_the_rows_options_budget_and_first_seed(exported):
    config = load_config(exported)
    validate(config)  # paths exist, values in range: llm-modules train would start
    assert config.compose_options() == ComposeOptions(**composed_options(ROW))
    assert (config.topology, config.head, config.mixture_gate, config.fusion_layers) == (
        "fusion", "source_mix", "confidence", [])
    assert (config.lr_connector, config.lr_target, config.lr_mixture) == (
        BUDGET.lr, BUDGET.target_lr, BUDGET.mixture_lr)
    assert (config.max_steps, config.batch_size, config.seed, config.weight_decay) == (BUDGET.steps, 4, 3, 0.0)
    text = exported.read_text()
    assert f"llm-modules train --config {exported}" in text and f"llm-modules eval {exported.parent / 'run'}" in text
    assert yaml.safe_load(text)["model"]["mixture_gate"] == "confidence"  # comments are comments


def test_the_exported_data_tokenizes_to_the_demos_training_and_scoring_sequences(exported, bench):
    folder = exported.parent
    tokenizer = load_tokenizer(str(folder / "target"), "target")
    examples, _ = build_examples(folder / "train.jsonl", tokenizer, DataOptions(template="chat"))
    for example, trace in zip(examples, bench.traces(bench.world.transfer), strict=True):
        n = len(trace.input_ids)  # the chat template adds one untrained newline after the end of the turn
        assert example["input_ids"][:n] == trace.input_ids and example["labels"][:n] == trace.labels
        assert example["input_ids"][n:] == tokenizer("\n").input_ids and set(example["labels"][n:]) == {-100}
    renderer = Renderer(tokenizer, "chat")
    for record, fact in zip(read_records(folder / "test.jsonl"), bench.world.test, strict=True):
        trace = encode_trace(bench.tokenizer, bench.world, fact)
        prompt = renderer.prompt(to_messages(record, "sharegpt"))
        assert tokenizer(prompt, add_special_tokens=False).input_ids == trace.input_ids[: trace.prompt_length]


def test_an_export_never_writes_into_a_folder_with_files(tmp_path):
    check_export_folder(tmp_path / "new")
    check_export_folder(tmp_path)  # empty
    (tmp_path / "old.txt").write_text("x")
    with pytest.raises(LLMModulesError, match="is not empty"):
        check_export_folder(tmp_path)
    with pytest.raises(LLMModulesError, match="is not a folder"):
        check_export_folder(tmp_path / "old.txt")


def test_the_row_is_the_best_composed_one_or_the_one_named():
    frozen = bridge_spec(train_target="none")  # a harness-only option llm-modules train cannot express
    assert exportable(ROW) and exportable(bridge_spec()) and not exportable(frozen)
    methods = [bridge_spec(), ROW, frozen]
    results = results_of(**{bridge_spec().name: [0.3], ROW.name: [0.2], frozen.name: [0.9]})
    assert choose_row(methods, results) == bridge_spec()
    results["methods"][ROW.name]["validation_accuracy"] = [0.5]  # chosen on validation facts, never on test
    assert choose_row(methods, results) == ROW
    assert choose_row(methods, results, ROW.name) == ROW
    with pytest.raises(LLMModulesError, match="is not a composed row"):
        choose_row(methods, results, frozen.name)
    with pytest.raises(LLMModulesError, match="no composed"):
        choose_row([MethodSpec("target_alone", "target_alone")], results)


def test_demo_export_mistakes_exit_2_before_any_pretraining(tmp_path, capsys, monkeypatch):
    import llm_modules.evaluation.compare as compare

    monkeypatch.setattr(compare, "run_comparison", lambda *a, **k: pytest.fail("the demo ran before the check"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "file").write_text("x")
    assert main(["demo", "--export", str(tmp_path / "full"), "--quiet"]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert main(["demo", "--export", str(tmp_path / "new"), "--export-method", "target_alone", "--quiet"]) == 2
    assert "is not a composed row" in capsys.readouterr().err
    assert main(["demo", "--export-method", ROW.name, "--quiet"]) == 2
    assert "give --export DIR too" in capsys.readouterr().err


TINY_DEMO = """\
output: {output}
seeds: [0]
world: {{kind: composition, entities: 6, relations: 4, background_entities: 4}}
source: {{family: llama, hidden: 32, layers: 2, heads: 2, steps: 10, eval_every: 10}}
target: {{family: llama, hidden: 32, layers: 1, heads: 2, steps: 10, eval_every: 10}}
budget: {{steps: 4, batch_size: 4, eval_every: 2, validation_facts: 3, mixture_lr: 0.03}}
methods:
  - {{kind: fusion, memory: sequence, head: source_mix, fusion_layers: [], mixture_gate: confidence}}
workers: 1
"""


def test_demo_export_then_train_then_eval_end_to_end(tmp_path, capsys):
    config = tmp_path / "demo.yaml"
    config.write_text(TINY_DEMO.format(output=tmp_path / "demo"))
    folder = tmp_path / "export"
    assert main(["demo", "--config", str(config), "--export", str(folder), "--quiet"]) == 0
    assert f"llm-modules train --config {folder.resolve() / 'train.yaml'}" in capsys.readouterr().out
    assert main(["train", "--config", str(folder / "train.yaml"), "--progress", "false"]) == 0
    trained = json.loads((folder / "run" / "train_results.json").read_text())
    demo = json.loads((tmp_path / "demo" / "results.json").read_text())["methods"][ROW.name]
    assert trained["steps"] == 4  # the demo's budget
    assert sum(trained["trainable_parameters"].values()) == demo["trainable_params"]  # the same weights train
    capsys.readouterr()
    assert main(["eval", str(folder / "run"), "--data", str(folder / "test.jsonl"), "--max-new-tokens", "8",
                 "--limit", "4"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["exact_match_rows"] == scored["rows"] == 4 and 0.0 <= scored["exact_match"] <= 1.0


def test_the_exported_budget_and_eval_command_follow_the_demos_loop_and_scoring():
    import inspect

    from llm_modules.evaluation.factworld.export import EVAL_MAX_NEW_TOKENS, WARMUP_STEPS
    from llm_modules.evaluation.factworld.lm import train_loop
    from llm_modules.evaluation.factworld.metrics import evaluate_traces

    loop = inspect.signature(train_loop).parameters
    assert (loop["warmup"].default, loop["weight_decay"].default) == (WARMUP_STEPS, 0.0)
    assert inspect.signature(evaluate_traces).parameters["max_new_tokens"].default == EVAL_MAX_NEW_TOKENS
