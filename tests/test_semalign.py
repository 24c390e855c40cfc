"""SemAlign: semantic bases, attribution, depth map, vocabulary check, objective, training and plain reload."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from llm_modules import LLMModulesError
from realpaths import QWEN_05B, needs_models
from llm_modules.tiny import build_tokenizer, tiny_model
from llm_modules.training.config import config_from_argv, load_config
from llm_modules.training.semalign import (
    LayerPair,
    SemanticBases,
    VocabularyMismatchError,
    align_vocabularies,
    choose_pairs,
    depth_map,
    gradient_x_activation,
    interpolation,
    options_from_mapping,
    partner,
)
from llm_modules.training.semalign.bases import cached_semantic_map, output_head
from llm_modules.training.semalign.layers import LayerTaps
from llm_modules.training.semalign.objective import Frontier, Objective, cka_layer_loss, cosine_layer_loss
from llm_modules.model.loss import causal_lm_loss
from llm_modules.training.semalign.plan import row_batches
from llm_modules.training.semalign.train import train_semalign
from llm_modules.training.command import train_main

REPO = Path(__file__).resolve().parents[1]


def round_trip_cosines(model, input_ids: torch.Tensor) -> torch.Tensor:
    """cos(h, S Sᵀ h) for every layer output and token of ``model`` on ``input_ids``: decompose, then recompose."""
    bases = SemanticBases.from_head(output_head(model))
    with torch.no_grad():
        hidden = torch.cat(model(input_ids=input_ids, output_hidden_states=True).hidden_states[1:], dim=0)
    hidden = hidden.reshape(-1, hidden.shape[-1]).float()
    return torch.nn.functional.cosine_similarity(hidden, bases.recompose(bases.decompose(hidden)), dim=-1)


# ------------------------------------------------------------------------------------------ bases
def test_bases_are_unit_columns_of_the_heads_pseudo_inverse(tokenizer):
    model = tiny_model("qwen2", tokenizer, hidden=32)
    head = output_head(model)  # [V, D]
    bases = SemanticBases.from_head(head)
    assert bases.vectors.shape == (32, head.shape[0])
    assert torch.allclose(bases.vectors.norm(dim=0), torch.ones(head.shape[0]), atol=1e-5)
    pinv = torch.linalg.pinv(head)
    assert torch.allclose(bases.vectors[:, 7], pinv[:, 7] / pinv[:, 7].norm(), atol=1e-6)
    # the pseudo-inverse is the least-squares way back: head @ s_i puts its largest logit on token i (mostly)
    hits = (head @ bases.vectors).argmax(0) == torch.arange(head.shape[0])
    assert hits.float().mean() > 0.9


def test_bases_round_trip_keeps_the_direction_of_a_tiny_models_states(tokenizer):
    model = tiny_model("qwen2", tokenizer, hidden=32, layers=2)
    ids = tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    cosines = round_trip_cosines(model, ids)
    assert cosines.min() >= 0.9, cosines.min()


def test_semantic_map_is_cached_on_disk_and_fingerprinted_by_both_heads(tokenizer, tmp_path):
    source, target = tiny_model("qwen2", tokenizer, hidden=48), tiny_model("gpt_neo", tokenizer, hidden=32)
    alignment = align_vocabularies(tokenizer, tokenizer, len(tokenizer), len(tokenizer))
    first, fingerprint, from_disk = cached_semantic_map(output_head(source), output_head(target), alignment, tmp_path)
    assert first.shape == (32, 48) and not from_disk
    again, same, from_disk = cached_semantic_map(output_head(source), output_head(target), alignment, tmp_path)
    assert from_disk and same == fingerprint and torch.equal(first, again)
    other_head = output_head(target) * 1.5
    _, changed, from_disk = cached_semantic_map(output_head(source), other_head, alignment, tmp_path)
    assert changed != fingerprint and not from_disk
    assert len(list(tmp_path.glob("semantic-map-*.safetensors"))) == 2


def test_mismatched_vocabularies_get_an_error_naming_the_first_differing_tokens():
    source = build_tokenizer()
    target = build_tokenizer(["completely different words for another vocabulary entirely"], vocab_size=300)
    with pytest.raises(VocabularyMismatchError) as error:
        align_vocabularies(source, target, len(source), len(target))
    message = str(error.value)
    first = min(i for t, i in source.get_vocab().items() if target.get_vocab().get(t) != i)
    token = {i: t for t, i in source.get_vocab().items()}[first]
    assert f"id {first}: source {token!r}" in message and "shared_tokens_only" in message
    shared = align_vocabularies(source, target, len(source), len(target), shared_tokens_only=True)
    inverse_s = {i: t for t, i in source.get_vocab().items()}
    inverse_t = {i: t for t, i in target.get_vocab().items()}
    assert shared.shared_only and len(shared.source_ids) > 200
    assert all(inverse_s[s] == inverse_t[t] for s, t in zip(shared.source_ids, shared.target_ids))


def test_padding_rows_of_a_head_get_no_basis(tokenizer):
    alignment = align_vocabularies(tokenizer, tokenizer, len(tokenizer) + 64, len(tokenizer) + 64)
    assert alignment.source_ids == list(range(len(tokenizer)))


# ------------------------------------------------------------------------------------ depth map
def test_depth_map_40_to_32_and_28_to_24_match_the_papers_formulas():
    assert [depth_map(k, 40, 32) for k in (1, 2, 3, 4, 5, 8, 16, 31, 32)] == [1, 2, 3, 5, 6, 10, 20, 38, 40]
    assert [depth_map(k, 28, 24) for k in (1, 5, 6, 7, 12, 23, 24)] == [1, 5, 7, 8, 14, 26, 28]
    for source, target in ((40, 32), (28, 24)):
        for k in range(1, target + 1):
            assert depth_map(k, source, target) == max(1, int(source / target * k))
    # k† = min{k : ℓ(k) >= ℓ*}
    assert partner(6, 40, 32) == 5 and partner(4, 40, 32) == 4 and partner(40, 40, 32) == 32
    assert partner(6, 28, 24) == 6 and partner(7, 28, 24) == 6 and partner(28, 28, 24) == 24
    for source, target in ((40, 32), (28, 24)):
        for critical in range(1, source + 1):
            k = partner(critical, source, target)
            assert depth_map(k, source, target) >= critical and (k == 1 or depth_map(k - 1, source, target) < critical)
    # u = L_src k / L_tgt, a = max(1, min(⌊u⌋, L_src - 1)), b = a + 1, λ = clip(u - a, 0, 1)
    assert interpolation(5, 40, 32) == (6, 7, pytest.approx(0.25))
    assert interpolation(4, 40, 32) == (5, 6, pytest.approx(0.0))
    assert interpolation(32, 40, 32) == (39, 40, pytest.approx(1.0))
    assert interpolation(5, 28, 24) == (5, 6, pytest.approx(5 / 6))
    assert interpolation(6, 28, 24) == (7, 8, pytest.approx(0.0))
    assert interpolation(1, 28, 24) == (1, 2, pytest.approx(1 / 6))


def test_pairs_from_attribution_scores_skip_collisions_and_sort_by_depth():
    scores = [0.1, 0.2, 9.0, 0.3, 5.0, 4.9, 0.0, 0.0]  # source layers 1..8, target of 4 layers
    pairs = choose_pairs(scores, 4, 2)
    # ℓ* = 3 -> k† = 2 (ℓ(2) = 4); ℓ* = 5 -> k† = 3 (ℓ(3) = 6); 6 would also land on 3, so it is skipped
    assert [(p.target, p.critical) for p in pairs] == [(2, 3), (3, 5)]
    assert pairs[0] == LayerPair(2, 4, 5, 0.0, 3)
    assert [p.target for p in choose_pairs(scores, 4, 3)] == [1, 2, 3]  # 6 and 4 collide; 2 -> k† = 1
    assert [p.critical for p in choose_pairs(scores, 4, 1, critical=[8])] == [8]


# ---------------------------------------------------------------------------------- attribution
@pytest.mark.parametrize("planted", [2, 3])
def test_attribution_picks_the_layer_where_a_planted_signal_lives(tokenizer, planted):
    model = tiny_model("llama", tokenizer, hidden=32, layers=4, seed=1)
    with torch.no_grad():  # every layer writes little into the residual stream except the planted one
        for index, layer in enumerate(model.model.layers, start=1):
            scale = 8.0 if index == planted else 0.05
            layer.mlp.down_proj.weight.mul_(scale)
            layer.self_attn.o_proj.weight.mul_(scale)
    model.requires_grad_(False)
    ids = tokenizer(["The quick brown fox jumps", "A small model learns from a large one"]).input_ids
    rows = [{"input_ids": r, "labels": r} for r in ids]
    scores = gradient_x_activation(model, row_batches(rows, 2, tokenizer.pad_token_id), causal_lm_loss)
    assert len(scores) == 4 and max(range(4), key=lambda i: scores[i]) + 1 == planted
    assert scores[planted - 1] > 3 * sorted(scores)[-2]


def test_taps_read_the_layer_contribution_before_the_residual_add(tokenizer):
    model = tiny_model("qwen2", tokenizer, hidden=32, layers=3)
    ids = tokenizer("The quick brown fox", return_tensors="pt").input_ids
    with LayerTaps(model, [1, 2, 3], "contribution") as taps, torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    for layer in (1, 2):  # hidden_states[-1] is after the final norm, so the last layer is checked through its output
        assert torch.allclose(taps.values[layer], hidden[layer] - hidden[layer - 1], atol=1e-5)
    with LayerTaps(model, [2], "mlp") as mlp_taps, torch.no_grad():
        model(input_ids=ids)
    assert mlp_taps.values[2].shape == taps.values[2].shape
    assert not torch.allclose(mlp_taps.values[2], taps.values[2])  # the MLP alone, without attention's part


# ------------------------------------------------------------------------------------ objective
def test_layer_losses_vanish_when_the_student_follows_the_mapped_direction():
    torch.manual_seed(0)
    mapped = torch.randn(2, 5, 8)
    mask = torch.ones(2, 5)
    assert cosine_layer_loss(3.0 * mapped, mapped, mask) < 1e-6
    assert cosine_layer_loss(-mapped, mapped, mask) == pytest.approx(2.0)
    assert cka_layer_loss(2.0 * mapped + 1.0, mapped, mask) < 1e-5  # CKA: scale and shift do not matter
    rotation = torch.linalg.qr(torch.randn(8, 8))[0]
    assert cka_layer_loss(mapped @ rotation, mapped, mask) < 1e-5  # nor does a rotation: only the geometry
    assert cka_layer_loss(torch.randn(2, 5, 8), mapped, mask) > 0.05


def test_objective_maps_the_interpolated_source_tap_through_m():
    torch.manual_seed(0)
    matrix = torch.randn(4, 6)
    taps = ["contribution:1", "contribution:2"]
    source = torch.randn(1, 3, 2, 6)
    pair = LayerPair(target=1, source_a=1, source_b=2, weight=0.25, critical=1)
    wanted = (0.75 * source[:, :, 0] + 0.25 * source[:, :, 1]) @ matrix.T
    objective = Objective([pair], matrix, taps, layer_loss="cosine", output_loss="none")
    loss, parts = objective({1: wanted * 2}, torch.zeros(1, 3, 5), torch.full((1, 3), -100), torch.ones(1, 3), source)
    assert float(loss) < 1e-6 and parts["layer_1"] < 1e-6
    loss, _ = objective({1: -wanted}, torch.zeros(1, 3, 5), torch.full((1, 3), -100), torch.ones(1, 3), source)
    assert float(loss) == pytest.approx(2.0, abs=1e-5)


def test_frontier_trains_one_pair_per_phase_shallow_to_deep():
    pairs = [LayerPair(5, 6, 7, 0.25, 6), LayerPair(2, 2, 3, 0.5, 2)]
    frontier = Frontier(pairs, enabled=True)
    assert [frontier.active(step, 10) for step in (0, 4, 5, 9)] == [[2], [2], [5], [5]]
    assert Frontier(pairs, enabled=False).active(3, 10) is None


def test_options_pick_version_defaults_and_refuse_unknown_keys():
    v1, v2 = options_from_mapping({}), options_from_mapping({"version": "v2"})
    assert (v1.layer_loss, v1.output_loss, v1.frontier, v1.mode, v1.lora_r) == ("cosine", "cosine", False, "lora", 16)
    assert (v2.layer_loss, v2.output_loss, v2.frontier) == ("cka", "kl", True)
    assert v1.lora_modules == ["up_proj", "down_proj", "v_proj", "o_proj"]
    assert options_from_mapping({"version": "v2", "frontier": "false", "critical_layers": "3,5"}).critical_layers == [3, 5]
    with pytest.raises(LLMModulesError, match="did you mean mode"):
        options_from_mapping({"mdoe": "lora"})
    with pytest.raises(LLMModulesError, match="semalign.mode"):
        options_from_mapping({"mode": "everything"})


def test_command_line_sets_the_method_and_semalign_options_over_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("method: semalign\nsemalign:\n  mode: layers\n  pairs: 3\n")
    config = config_from_argv(["--config", str(path), "--semalign.pairs", "1", "--semalign.version", "v2"])
    assert config.method == "semalign" and config.semalign == {"mode": "layers", "pairs": "1", "version": "v2"}
    assert load_config(path).semalign == {"mode": "layers", "pairs": 3}
    with pytest.raises(LLMModulesError, match="method"):
        config_from_argv(["--method", "semalgn"])


# ------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "chat.jsonl"
    with path.open("w") as handle:
        for i in range(16):
            handle.write(json.dumps({"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                                                  {"role": "assistant", "content": f"{2 * i}"}]}) + "\n")
    return path


def semalign_argv(source, target, data, output, *extra) -> list[str]:
    return ["--method", "semalign", "--source", source, "--target", target, "--data", str(data), "--output", str(output),
            "--max-steps", "4", "--batch-size", "4", "--validation", "0", "--report-to", "none", "--progress", "false",
            "--lr-target", "1e-3", "--logging-steps", "1", "--semalign.map_cache", "none",
            "--semalign.attribution_rows", "8", *extra]


PLAIN_RELOAD = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
ids = torch.tensor([[int(x) for x in sys.argv[2].split(",")]])
with torch.no_grad():
    logits = model(input_ids=ids).logits
torch.save(logits, sys.argv[3])
assert not any(name.startswith("llm_modules") for name in sys.modules), "llm_modules was imported"
print(type(model).__name__)
"""


def reload_logits_plainly(folder: Path, ids: list[int], tmp_path: Path) -> tuple[torch.Tensor, str]:
    """Logits of ``folder`` loaded by plain transformers in a fresh interpreter that never imports llm_modules."""
    out = tmp_path / "logits.pt"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", PLAIN_RELOAD, str(folder), ",".join(map(str, ids)), str(out)],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    return torch.load(out), done.stdout.strip()


@pytest.mark.parametrize("mode", ["lora", "layers"])
def test_semalign_trains_the_target_alone_and_it_reloads_with_plain_transformers(
        model_folder, chat_file, tmp_path, tokenizer, mode):
    source, target = model_folder("qwen2", hidden=48, layers=4), model_folder("llama", hidden=32, layers=2)
    output = tmp_path / mode
    argv = semalign_argv(source, target, chat_file, output, "--semalign.mode", mode, "--semalign.pairs", "2")
    assert train_main(argv) == 0
    results = json.loads((output / "train_results.json").read_text())
    plan = json.loads((output / "semalign_plan.json").read_text())
    assert results["steps"] == 4 and results["saved_as"] == "model"
    assert [p["target"] for p in plan["pairs"]] == [1, 2] and len(plan["attribution"]) == 4
    assert (output / "semalign_pairs.png").stat().st_size > 1000
    base = AutoModelForCausalLM.from_pretrained(target)
    trained = AutoModelForCausalLM.from_pretrained(output)
    changed = {n for n, p in trained.named_parameters() if not torch.equal(p, base.get_parameter(n))}
    assert changed, "nothing of the target changed"
    if mode == "layers":  # only the paired layers' own weights train
        assert all(n.startswith("model.layers.") for n in changed)
    ids = tokenizer("What is 3 + 3?").input_ids
    plain, kind = reload_logits_plainly(output, ids, tmp_path)
    assert kind == "LlamaForCausalLM"
    with torch.no_grad():
        here = trained.eval()(input_ids=torch.tensor([ids])).logits
    assert torch.allclose(plain, here, atol=1e-5)


def test_semalign_v2_with_the_cache_computes_source_taps_once(model_folder, chat_file, tmp_path):
    source, target = model_folder("qwen2", hidden=48, layers=4), model_folder("llama", hidden=32, layers=2)
    cache = tmp_path / "cache"
    extra = ["--semalign.version", "v2", "--semalign.mode", "full", "--cache", str(cache), "--semalign.pairs", "2"]
    first = train_semalign(config_from_argv(semalign_argv(source, target, chat_file, tmp_path / "a", *extra)))
    results = json.loads((tmp_path / "a" / "train_results.json").read_text())
    assert results["cache"]["computed"] == 16 and results["cache"]["taps"][-1] == "final"
    assert "semalign_output" in str(first.log_history)
    train_semalign(config_from_argv(semalign_argv(source, target, chat_file, tmp_path / "b", *extra)))
    second = json.loads((tmp_path / "b" / "train_results.json").read_text())
    assert second["cache"]["computed"] == 0 and second["source_loaded"] is True  # loaded for attribution only
    frontier = [e for e in first.log_history if "semalign_layer" in e]
    assert frontier, "the layer loss was never logged"
    # the frontier: the first half of the steps trains pair 1 only, the second half pair 2 only
    assert all(("semalign_layer_1" in e) != ("semalign_layer_2" in e) for e in frontier)


def test_semalign_adapter_folder_loads_with_plain_transformers(model_folder, chat_file, tmp_path, tokenizer):
    pytest.importorskip("peft")
    source, target = model_folder("qwen2", hidden=48, layers=4), model_folder("llama", hidden=32, layers=2)
    output = tmp_path / "adapter"
    argv = semalign_argv(source, target, chat_file, output, "--semalign.merge", "false",
                         "--semalign.critical_layers", "2")
    result = train_semalign(config_from_argv(argv))
    assert (output / "adapter_config.json").exists()
    ids = tokenizer("What is 3 + 3?").input_ids
    plain, _ = reload_logits_plainly(output, ids, tmp_path)
    with torch.no_grad():
        here = result.model.eval()(input_ids=torch.tensor([ids])).logits
    assert torch.allclose(plain, here, atol=1e-5)


# -------------------------------------------------------------------------------- the real model
@pytest.mark.slow
@needs_models(QWEN_05B)
def test_bases_round_trip_a_real_models_hidden_states():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(QWEN_05B)
    model = AutoModelForCausalLM.from_pretrained(QWEN_05B, dtype=torch.float32).eval()
    text = "Which of these is a renewable source of energy? A. coal B. wind C. oil D. natural gas. Answer: B"
    cosines = round_trip_cosines(model, tokenizer(text, return_tensors="pt").input_ids)
    print(f"\nround trip cosine over {cosines.numel()} states of 24 layers: min {cosines.min():.4f}, "
          f"mean {cosines.mean():.4f}")
    assert cosines.min() >= 0.9


# ---------------------------------------------------------------------------------- fact world
@pytest.fixture(scope="module")
def world_bench():
    from llm_modules.evaluation.factworld.lm import build_world_tokenizer
    from llm_modules.evaluation.factworld.methods import Workbench
    from llm_modules.evaluation.factworld.models import pretrain_source, pretrain_target
    from llm_modules.evaluation.factworld.world import build_world

    world = build_world(entities=8, relations=4, background_entities=4, transfer_fraction=0.25, seed=0)
    tokenizer = build_world_tokenizer(world)
    source, _ = pretrain_source(world, tokenizer, hidden=64, layers=4, heads=4, steps=40, progress=False)
    target, _ = pretrain_target(world, tokenizer, hidden=32, layers=2, heads=2, steps=20, progress=False)
    return Workbench(world, tokenizer, source, target)


def test_semalign_is_a_fact_world_method_with_its_own_options(world_bench):
    from llm_modules.evaluation.factworld.methods import Budget, method_from_mapping, run_method

    assert method_from_mapping({"kind": "semalign"}).name == "semalign"
    spec = method_from_mapping({"kind": "semalign", "version": "v2", "mode": "layers"})
    assert spec.name == "semalign_v2_layers" and spec.kind == "semalign"
    with pytest.raises(LLMModulesError, match="unknown semalign option"):
        method_from_mapping({"kind": "semalign", "gate": "tanh"})
    budget = Budget(steps=6, batch_size=8, eval_every=3, validation_facts=4)
    before = {n: p.clone() for n, p in world_bench.target.named_parameters()}
    lora = run_method(method_from_mapping({"kind": "semalign"}), world_bench, budget, seed=0, progress=False)
    layers = run_method(spec, world_bench, budget, seed=0, progress=False)
    total = sum(p.numel() for p in world_bench.target.parameters())
    assert 0 < lora.trainable_params < total  # LoRA r16 on GPT-Neo's c_fc/c_proj/v_proj/out_proj
    assert 0 < layers.trainable_params < total  # both blocks, not the embeddings or the head
    assert lora.train.steps_run == 6 and all(torch.isfinite(torch.tensor(lora.train.losses)))
    assert 0 <= lora.scores.accuracy <= 1 and 0 <= layers.scores.accuracy <= 1
    assert all(torch.equal(p, before[n]) for n, p in world_bench.target.named_parameters())  # the shared target is untouched
