"""SemAlign as a method of the fact-world comparison (``kind: semalign`` in ``llm-modules compare``).

The fact world trains its methods in its own small loop (``evaluation/factworld/lm.py`` says why);
this module gives that loop SemAlign's model and loss: the target (a copy of the world's pretrained
target), planned against the world's source on the transfer traces (map M, attribution, pairs), and
a loss function over batches of traces. The source's taps are computed live (the world's source is tiny).
"""

from __future__ import annotations

import copy
from dataclasses import fields
from typing import Any, Callable

import torch
from torch import nn

from ...training.semalign.bases import output_head
from ...training.semalign.layers import LayerTaps, layer_count
from ...training.semalign.models import prepare_target, set_frontier, source_tap_states
from ...training.semalign.objective import Frontier, Objective
from ...training.semalign.options import SemAlignOptions, options_from_mapping
from ...training.semalign.plan import plan_alignment

OPTIONS = tuple(f.name for f in fields(SemAlignOptions))
# The world's target has 2 layers: align both; the map is tiny (V = 1024), so it is not stored.
WORLD_DEFAULTS = {"pairs": 2, "map_cache": None}


def method_name(options: dict[str, Any]) -> str:
    """``semalign`` plus a suffix per option that differs from the library's defaults (``semalign_v2_layers``)."""
    name = "semalign"
    for key in ("version", "mode", "layer_loss", "output_loss", "interface"):
        if key in options and str(options[key]) != str(getattr(SemAlignOptions(), key)):
            name += f"_{options[key]}"
    return name


def world_options(options: dict[str, Any], name: str = "semalign") -> SemAlignOptions:
    return options_from_mapping({**WORLD_DEFAULTS, **options}, where=f"method {name!r}")


def build_model(options: dict[str, Any], bench, seed: int) -> nn.Module:
    """The world's target, planned against its source and made trainable as the options say.

    ``bench``: the fact world's Workbench (world, tokenizer, source, target). The plan and the
    per-layer parameters ride on the returned module as ``semalign_run`` for :func:`loss_fn`.
    """
    torch.manual_seed(seed)
    settings = world_options(options)
    target = copy.deepcopy(bench.target)
    traces = bench.traces(bench.world.transfer)
    rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in traces]
    tokenizer = bench.tokenizer
    plan = plan_alignment(bench.source, layer_count(bench.source), output_head(bench.source), output_head(target),
                          layer_count(target), tokenizer, tokenizer, rows, settings, tokenizer.pad_token_id)
    model, by_layer = prepare_target(target, settings, plan.pairs)
    model.semalign_run = (settings, plan, by_layer)
    return model


def loss_fn(model: nn.Module, bench, steps: int) -> Callable[[list], torch.Tensor]:
    """Traces -> SemAlign's loss; the frontier (v2) advances one call per optimizer step over ``steps``."""
    from .lm import collate, logits_of

    settings, plan, by_layer = model.semalign_run
    objective = Objective(plan.pairs, plan.semantic_map, plan.taps, settings.interface, settings.layer_loss,
                          settings.output_loss, settings.layer_weight, settings.output_weight, settings.temperature,
                          settings.alpha, plan.source_head)
    frontier = Frontier(plan.pairs, bool(settings.frontier) and objective.uses_layers)
    layers = [p.target for p in plan.pairs] if objective.uses_layers else []
    step = [0]

    def compute(batch: list) -> torch.Tensor:
        tensors = collate(batch, bench.tokenizer.pad_token_id)
        ids, mask, labels = tensors["input_ids"], tensors["attention_mask"], tensors["labels"]
        states = source_tap_states(bench.source, ids, mask, plan.taps) if plan.taps else None
        active = frontier.active(step[0], steps)
        set_frontier(by_layer, active)
        step[0] += 1
        with LayerTaps(model, layers, settings.interface) as taps:
            logits = logits_of(model, ids, mask)
        set_frontier(by_layer, None)  # the graph is built: outside this step every trained weight counts as such
        loss, _ = objective(taps.values, logits, labels, mask, states, active)
        return loss

    return compute
