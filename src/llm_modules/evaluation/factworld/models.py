"""Pretraining the fact world's two models from scratch: the source (knows every fact) and the target
(knows the world's language and trace format, and in the composition world the cipher; none of the facts)."""

from __future__ import annotations

import math
import random
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from ...tiny import save_tiny, tiny_config
from ...training.result import TrainResult
from .lm import Example, causal_lm_loss_fn, check_tokenizer_roundtrip, encode_text, encode_trace, train_loop
from .metrics import source_recall, target_skill as skill_of
from .world import Fact, FactWorld

FACTS_PER_DOCUMENT = 4  # mentions per source pretraining document


def _new_model(family: str, tokenizer: PreTrainedTokenizerBase, seed: int, **sizes) -> PreTrainedModel:
    torch.manual_seed(seed)
    config = tiny_config(family, vocab_size=len(tokenizer), tokenizer=tokenizer, **sizes)
    return AutoModelForCausalLM.from_config(config)


def pretrain_source(
    world: FactWorld,
    tokenizer: PreTrainedTokenizerBase,
    family: str = "qwen2",
    hidden: int = 128,
    layers: int = 4,
    heads: int = 4,
    steps: int = 1500,
    batch_size: int = 32,
    lr: float = 3e-3,
    repeats: int | None = None,
    seed: int = 0,
    target_recall: float = 1.0,
    eval_every: int = 100,
    progress: bool = True,
) -> tuple[PreTrainedModel, TrainResult]:
    """A source (``family``, Qwen2 by default) trained from scratch on every fact in varied contexts (``source_documents``).

    Stops once its recall at the trace answer point reaches ``target_recall`` on all facts (checked every
    ``eval_every`` steps) or after ``steps``.

    ``repeats`` (mentions of each fact) defaults to enough documents that training never sees one twice.
    This matters more than size: with a few hundred fixed documents and many epochs, a tiny model
    memorises each document verbatim (the answer predicted from the neighbouring mentions) and its
    recall at the trace answer point stays at chance (measured: 8x4 world, 2 layers x 64, 600 steps:
    12.5% with 6 repeats, 56% with 150, 100% after 250 steps with fresh documents).
    """
    model = _new_model(family, tokenizer, seed, hidden=hidden, layers=layers, heads=heads)
    if repeats is None:
        repeats = max(1, math.ceil(steps * batch_size * FACTS_PER_DOCUMENT / len(world.facts)))
    documents = world.source_documents(repeats=repeats, facts_per_document=FACTS_PER_DOCUMENT, seed=seed)
    examples = [encode_text(tokenizer, d) for d in documents]
    model.train()

    def recall() -> float:
        model.eval()
        score = source_recall(model, tokenizer, world, world.facts, where="trace")
        model.train()
        return score

    result = train_loop(
        model.parameters(), causal_lm_loss_fn(model, tokenizer.pad_token_id), examples, steps,
        batch_size=batch_size, lr=lr, seed=seed, evaluate=recall, eval_every=eval_every, stop_at=target_recall,
        description="pretrain source", progress=progress,
    )
    model.eval()
    return model, result


def pretrain_target(
    world: FactWorld,
    tokenizer: PreTrainedTokenizerBase,
    family: str = "gpt_neo",
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    steps: int = 400,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
    target_skill: float | None = None,
    eval_every: int = 100,
    progress: bool = True,
) -> tuple[PreTrainedModel, TrainResult]:
    """A target of ``family`` (a ``tiny.tiny_config`` family) trained from scratch on traces and sentences about
    the *background* entities only, with values drawn afresh for every example (``background_traces``): it learns
    the trace format and the world's language (in the composition world also the cipher, from its traces and from
    ``world.target_sentence``), none of the world's facts. No example is seen twice.

    The composition world's target is a Llama: a GPT-Neo of the same size (learned absolute positions) had not
    learned to copy the recalled number within its thought after 1,250 steps (31% teacher-forced) nor the cipher (1%),
    where a Llama (rotary positions) copied after 500 steps (99%) and knew the cipher after 1,000 (100%; 64 wide,
    2 layers, batch 32, measured on the demo world).

    ``target_skill``: stop once the target, given the fact, answers that share of ``world.skill_probe()`` (checked
    every ``eval_every`` steps); None trains all ``steps``."""
    model = _new_model(family, tokenizer, seed, hidden=hidden, layers=layers, heads=heads)
    examples = []
    for i, fact in enumerate(world.background_traces(steps * batch_size, seed=seed)):
        if i % 4 == 3:
            examples.append(encode_text(tokenizer, world.target_sentence(fact)))
        else:
            traced = encode_trace(tokenizer, world, fact, i % world.question_forms)
            examples.append(Example(traced.input_ids, list(traced.input_ids)))  # all tokens: learn the format
    model.train()

    def skill() -> float:
        model.eval()
        score = skill_of(model, tokenizer, world)
        model.train()
        return score

    result = train_loop(
        model.parameters(), causal_lm_loss_fn(model, tokenizer.pad_token_id), examples, steps,
        batch_size=batch_size, lr=lr, seed=seed, evaluate=skill if target_skill is not None else None,
        eval_every=eval_every, stop_at=target_skill, description="pretrain target", progress=progress,
    )
    model.eval()
    return model, result


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: str | Path, check: list[str]) -> Path:
    """Save as an ordinary HF folder and verify that its ``AutoTokenizer`` reproduces the trained ids."""
    folder = save_tiny(model, tokenizer, folder)
    check_tokenizer_roundtrip(tokenizer, folder, check)
    return folder


def facts_sample(facts: list[Fact], count: int, seed: int = 0) -> list[Fact]:
    return random.Random(seed).sample(facts, min(count, len(facts)))
