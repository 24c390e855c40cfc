"""What each training configuration builds: its model and one batch (bridge and fusion configurations)."""

from __future__ import annotations

import torch
from torch import nn

from llm_modules.model.modeling import LLMModulesForCausalLM

from .inputs import random_ids, source_inputs
from .models import compose, compose_fusion, random_causal_lm, source_config, target_config
from .plan import Plan


TRAIN_CONFIGS = ("without_cache", "with_cache", "target_only")
FUSION_TRAIN_CONFIGS = ("target_only", "fusion_without_cache", "fusion_with_cache")


def train_inputs(config: str, plan: Plan, model: nn.Module) -> dict[str, torch.Tensor]:
    """One batch for ``config``: token ids + labels, or cached source states + labels."""
    ids = random_ids(plan.train_batch, plan.train_seq, int(model.config.vocab_size), plan.device, seed=7)
    if config.startswith("fusion_"):
        return fusion_train_inputs(config, plan, model, ids)
    if config in ("target_only", "without_cache"):
        return {"input_ids": ids, "labels": ids}
    width = model.source_hidden_size
    states = torch.randn(plan.train_batch, plan.train_seq, width, generator=torch.Generator().manual_seed(7))
    return {"source_states": states.to(device=plan.device, dtype=plan.torch_dtype), "labels": ids}


def train_model(config: str, plan: Plan) -> nn.Module:
    """The model ``config`` trains: the composed model with or without its source, the target alone, or fusion."""
    if config.startswith("fusion_"):
        return fusion_train_model(config, plan)
    if config == "target_only":
        return random_causal_lm(target_config(plan.shapes), torch.float32, plan.device).train()
    source = None
    if config == "without_cache":
        source = random_causal_lm(source_config(plan.shapes), plan.torch_dtype, plan.device)
    return compose(plan.shapes, source, plan.device).train()


def fusion_train_model(config: str, plan: Plan) -> LLMModulesForCausalLM:
    """A training subprocess's model: fusion (sequence memory) with or without its source loaded."""
    target = random_causal_lm(target_config(plan.shapes), torch.float32, plan.device)
    source = None
    if config == "fusion_without_cache":
        source = random_causal_lm(source_config(plan.shapes), plan.torch_dtype, plan.device)
    return compose_fusion(plan, source, target, "sequence").to(plan.device).train()


def fusion_train_inputs(config: str, plan: Plan, model: LLMModulesForCausalLM, ids: torch.Tensor) -> dict:
    """Target ids + labels, and the source's ids (without cache) or its cached states [B, S, 1, d_s]."""
    source_vocab = int(model.config.source_config["vocab_size"])
    inputs = {"input_ids": ids, "labels": ids,
              **source_inputs(plan.train_batch, plan.train_seq, source_vocab, plan.device, seed=8)}
    if config == "fusion_with_cache":
        del inputs["source_input_ids"]
        states = torch.randn(plan.train_batch, plan.train_seq, 1, model.source_hidden_size,
                             generator=torch.Generator().manual_seed(7))
        inputs["source_states"] = states.to(device=plan.device, dtype=plan.torch_dtype)
    return inputs
