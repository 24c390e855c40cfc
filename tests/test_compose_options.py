"""One list of model options (ComposeOptions): compose(), the run config of ``llm-modules train`` and the fact-world
harness all take it or derive from it."""

from __future__ import annotations

import dataclasses
import types
import typing

import pytest

from llm_modules import ComposeOptions, LLMModulesError
from llm_modules.evaluation.factworld import methods
from llm_modules.model.configuration import compose_option_names
from llm_modules.training.config import TrainConfig, config_from_argv, config_from_mapping, load_config
from llm_modules.training.trainer import model_options


def test_unknown_options_and_bad_values_name_what_is_valid():
    with pytest.raises(LLMModulesError, match=r"unknown option\(s\) \['layers'\]; valid options: topology, "):
        ComposeOptions.from_mapping({"layers": 3})
    with pytest.raises(LLMModulesError, match="mixture_gate='entropy' is not supported; choose one of 'state', "
                                              "'confidence'"):
        ComposeOptions(mixture_gate="entropy")
    with pytest.raises(LLMModulesError, match="topology='star'.*'bridge', 'fusion'"):
        ComposeOptions(topology="star")
    with pytest.raises(LLMModulesError, match="head='target' is not supported; choose one of 'new'"):
        ComposeOptions(head="target")  # a fusion head on the bridge
    with pytest.raises(LLMModulesError, match=r"fusion_layers=\['0'\] is not supported; expected a list of int"):
        ComposeOptions(topology="fusion", fusion_layers=["0"])
    with pytest.raises(LLMModulesError, match="leaky='yes' is not supported; expected bool"):
        ComposeOptions(leaky="yes")
    assert ComposeOptions(topology="fusion", head="source_mix", fusion_layers=[]).to_kwargs(only_topology=True) == {
        **{k: v for k, v in dataclasses.asdict(ComposeOptions(topology="fusion")).items()
           if v is not None and k not in ("connector_layers", "intermediate_dim")},
        "head": "source_mix", "fusion_layers": []}


def test_every_literal_field_lists_its_choices_and_the_trainer_and_harness_derive_their_lists():
    hints = typing.get_type_hints(ComposeOptions)
    for name in compose_option_names():
        assert name in {f.name for f in dataclasses.fields(TrainConfig)}, name  # every option trains
    literals = [n for n, h in hints.items() if "Literal" in str(h)]
    assert {"topology", "target_init", "gate", "head", "memory", "train_target", "mixture_gate"} <= set(literals)
    assert set(methods.FUSION_OPTIONS) == set(compose_option_names("fusion")) - {"topology"}
    assert set(methods.BRIDGE_OPTIONS) == (set(compose_option_names("bridge")) - {"topology"}) | set(
        methods.HARNESS_OPTIONS)
    fusion = config_from_argv(["--topology", "fusion", "--memory", "sequence", "--head", "source_mix",
                               "--mixture-gate", "confidence", "--fusion-layers", "[]"])
    options = model_options(fusion)
    assert (options["mixture_gate"], options["fusion_layers"], options["topology"]) == ("confidence", [], "fusion")
    assert "connector_layers" not in options  # the bridge's options stay out of a fusion model
    assert "memory" not in model_options(TrainConfig())


def test_model_options_nest_under_model_in_yaml_and_on_the_command_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr_connector: 1e-4\nmodel:\n  topology: fusion\n  memory: sequence\n  head: source_mix\n"
                    "  mixture_gate: confidence\n  fusion_layers: []\nmixture_lr: 3e-2\n")
    loaded = load_config(path)
    assert (loaded.topology, loaded.head, loaded.mixture_gate, loaded.fusion_layers) == (
        "fusion", "source_mix", "confidence", [])
    assert loaded.lr_mixture == 3e-2 and loaded.compose_options().memory == "sequence"
    merged = config_from_argv(["--config", str(path), "--model.mixture-gate", "state", "--source-layers", "0,1"])
    assert (merged.mixture_gate, merged.source_layers, merged.head) == ("state", [0, 1], "source_mix")
    assert config_from_argv(["--model", "{head: source, gate: tanh}"]).gate == "tanh"
    with pytest.raises(LLMModulesError, match="option head is given twice, as head: 'new' and as model.head: "
                                              "'source'"):
        config_from_mapping({"head": "new", "model": {"head": "source"}})
    path.write_text("model:\n  mixture_gates: state\n")
    with pytest.raises(LLMModulesError, match=rf"{path}: unknown model option model.mixture_gates; did you mean "
                                              "mixture_gate"):
        load_config(path)
    path.write_text("model:\n  mixture_gate: entropy\n")
    with pytest.raises(LLMModulesError, match=rf"{path}: mixture_gate='entropy' is not supported; choose one of"):
        load_config(path)
    with pytest.raises(LLMModulesError, match="option model: expected a mapping"):
        config_from_mapping({"model": "fusion"})


def test_a_method_spec_checks_its_values_as_compose_will():
    with pytest.raises(LLMModulesError, match="method 'llm_modules_fusion_sequence_head_source_mix_gate_entropy': "
                                              "mixture_gate='entropy' is not supported"):
        methods.fusion_spec(memory="sequence", head="source_mix", mixture_gate="entropy")
    with pytest.raises(LLMModulesError, match="head='target' is not supported"):
        methods.method_from_mapping({"kind": "bridge", "head": "target"})
    spec = methods.method_from_mapping({"kind": "bridge", "attention_dropout": 0.2, "source_layer": -2})
    assert spec.options["attention_dropout"] == 0.2  # options compose takes are the harness's too


def _list_fields() -> dict[str, type]:
    """Every list option of the run config -> its item type."""
    out = {}
    for name, hint in typing.get_type_hints(TrainConfig).items():
        args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        hint = args[0] if typing.get_origin(hint) in (typing.Union, types.UnionType) else hint
        if typing.get_origin(hint) is list:
            out[name] = typing.get_args(hint)[0]
    return out


def test_every_list_option_takes_empty_bracketed_comma_and_yaml_text_on_the_command_line():
    lists = _list_fields()
    assert {"fusion_layers", "source_layers", "lora_target_modules", "report_to"} <= set(lists)
    samples = {int: ("0", "4"), str: ("q_proj", "v_proj")}
    for name, item in lists.items():
        a, b = samples[item]
        flag = "--" + name.replace("_", "-")
        expected = [item(a), item(b)]
        for text in (f"[{a},{b}]", f"[{a}, {b}]", f"{a},{b}", f"{a}, {b}", f"- {a}\n- {b}"):
            assert getattr(config_from_argv([flag, text]), name) == expected, (name, text)
            assert getattr(config_from_argv([f"{flag}={text}"]), name) == expected, (name, text)
        assert getattr(config_from_argv([flag, "[]"]), name) == [], name
        assert getattr(config_from_argv([flag, a]), name) == [item(a)], name
    with pytest.raises(LLMModulesError, match=r"option fusion_layers: expected int, got 'x'"):
        config_from_argv(["--fusion-layers", "[0, x]"])
    with pytest.raises(LLMModulesError, match=r"option fusion_layers: '\[0, 4' is not a list; write \[\]"):
        config_from_argv(["--fusion-layers", "[0, 4"])
    assert config_from_argv(["--fusion-layers", "none"]).fusion_layers is None  # the topology's default
