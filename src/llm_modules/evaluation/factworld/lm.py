"""Tokenizer, encoding and a small training loop for the fact world.

Why a plain torch loop and not ``Trainer`` here: the fact-world models are tiny (10^5-10^6 weights,
sequences of ~60 tokens) and each demo run trains a dozen of them on 2 CPU cores in minutes. At this
size ``Trainer``'s per-step overhead (callbacks, accelerate wrapping, dataloader workers, logging)
costs as much as the step itself (measured: about 2x wall time per step for a 100k-weight model), and
the loop needs per-method losses (KD), frozen-source features and early stopping on *generation-
relevant* validation accuracy, not loss. Real-model training rides ``llm_modules.training.trainer`` (Trainer).
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ...model.loss import IGNORE_INDEX, causal_lm_loss
from ...model.masks import positions_from_padding
from ...model.processing import shared_source_inputs
from ...tiny import build_tokenizer
from ...training.optim import clip_gradients
from ...training.padding import pad_rows
from ...training.result import TrainResult
from .world import TRACE_MARKERS, Fact, FactWorld

# ------------------------------------------------------------------------------------------ tokenizer


def build_world_tokenizer(world: FactWorld, vocab_size: int = 1024) -> PreTrainedTokenizerBase:
    """One byte-level BPE tokenizer for the whole world (source and target share it).

    The world's corpus is small: about 850 merges already make every word one token, as a real tokenizer's
    vocabulary does for common words (" rose", " nickel"). With 640, 24 of the 64 value words split into 2-5
    byte pieces (" rose" -> "Ġ r o s e"), and copying an unseen value became a chain of 5 pointer steps
    (measured on the demo world: 51% of unseen-answer facts right against 100% with 1024).
    """
    return build_tokenizer(world.corpus(), vocab_size=vocab_size, extra_special_tokens=TRACE_MARKERS)


def check_tokenizer_roundtrip(tokenizer: PreTrainedTokenizerBase, folder: str | Path, texts: Sequence[str]) -> None:
    """Raise if ``AutoTokenizer.from_pretrained(folder)`` gives other ids than ``tokenizer``.

    transformers 5 reloads a qwen2 folder's tokenizer as ``Qwen2Tokenizer``, which can split text otherwise."""
    reloaded = AutoTokenizer.from_pretrained(str(folder))
    for text in texts:
        a, b = tokenizer(text).input_ids, reloaded(text).input_ids
        if a != b:
            raise RuntimeError(
                f"the tokenizer saved in {folder} gives other ids once reloaded ({type(reloaded).__name__}):\n"
                f"{text!r}\ntrained {a}\nreloaded {b}"
            )


# ------------------------------------------------------------------------------------------- encoding


@dataclass
class Example:
    """One tokenized sequence. ``labels`` is -100 where no loss; ``answer`` indexes the recalled value's tokens
    inside the thought ("... Velmora's capital is| Quist|."), ``skill`` the tokens the target's skill produces from
    it (composition world; empty otherwise), ``prompt_length`` the generation prompt and ``fact_end`` the end of
    the recalled fact's sentence (a model "given the fact" is prompted up to there)."""

    input_ids: list[int]
    labels: list[int]
    prompt_length: int = 0
    answer: list[int] = field(default_factory=list)
    fact: Fact | None = None
    skill: list[int] = field(default_factory=list)
    fact_end: int = 0
    statement: list[int] = field(default_factory=list)  # the restated fact, name to value

    @property
    def knowledge(self) -> list[int]:
        """Every token that needs knowledge: the recalled value and the skill's output."""
        return self.answer + self.skill


def chat_prompt(tokenizer: PreTrainedTokenizerBase, world: FactWorld, fact: Fact, form: int = 0) -> str:
    record = world.trace_record(fact, form)
    messages = [
        {"role": "system", "content": record["system"]},
        {"role": "user", "content": record["conversations"][0]["value"]},
    ]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _span_tokens(offsets: list[tuple[int, int]], start: int, end: int, text: str) -> list[int]:
    """Indices of the tokens that exactly cover characters [start, end) of ``text``."""
    tokens = [i for i, (a, b) in enumerate(offsets) if a >= start and b <= end and b > a]
    if not tokens or offsets[tokens[0]][0] != start or offsets[tokens[-1]][1] != end:
        raise RuntimeError(f"{text[start:end]!r} is not a whole-token span in {text!r}")
    return tokens


def encode_trace(tokenizer: PreTrainedTokenizerBase, world: FactWorld, fact: Fact, form: int = 0) -> Example:
    """The chat text of a fact's trace; loss on the assistant turn; the recall and skill spans located in tokens."""
    prompt = chat_prompt(tokenizer, world, fact, form)
    reply = world.assistant_text(fact)
    full = prompt + reply + "<|im_end|>"
    encoded = tokenizer(full, return_offsets_mapping=True, add_special_tokens=False)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    if ids[: len(prompt_ids)] != prompt_ids:
        raise RuntimeError("the chat prompt does not tokenize as a prefix of the full trace")
    marks = world.marks(fact)
    answer = _span_tokens(offsets, len(prompt) + marks.recall[0], len(prompt) + marks.recall[1], full)
    skill = [] if marks.skill is None else _span_tokens(
        offsets, len(prompt) + marks.skill[0], len(prompt) + marks.skill[1], full)
    fact_end = next(i for i, (a, _) in enumerate(offsets) if a >= len(prompt) + marks.fact_end)
    statement = _span_tokens(offsets, len(prompt) + marks.statement[0], len(prompt) + marks.statement[1], full)
    labels = [IGNORE_INDEX] * len(prompt_ids) + ids[len(prompt_ids):]
    return Example(ids, labels, len(prompt_ids), answer, fact, skill, fact_end, statement)


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str) -> Example:
    """A plain pretraining document with loss on every token."""
    ids = tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    return Example(ids, list(ids))


def encode_recall(tokenizer: PreTrainedTokenizerBase, world: FactWorld, fact: Fact, composed: bool = False) -> Example:
    """The source's own format: "Remember: Velmora's capital is" + " Quist" (answer tokens indexed); with
    ``composed`` the composition world's question in that form (``FactWorld.own_prompt``)."""
    prompt, answer = world.own_prompt(fact, composed)
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    full_ids = tokenizer(f"{prompt} {answer}.", add_special_tokens=False).input_ids
    value_ids = full_ids[len(prompt_ids): -1] if full_ids[: len(prompt_ids)] == prompt_ids else []
    if not value_ids:
        raise RuntimeError(f"the answer of {fact} does not tokenize after its prompt")
    ids = prompt_ids + value_ids
    return Example(ids, [IGNORE_INDEX] * len(prompt_ids) + value_ids, len(prompt_ids),
                   list(range(len(prompt_ids), len(ids))), fact)


def collate(examples: Sequence[Example], pad_id: int, left: bool = False) -> dict[str, torch.Tensor]:
    """Pad to one batch: input_ids/attention_mask/labels [B, T]; ``offset`` [B] shift of each row (left padding)."""
    ids, mask = pad_rows([e.input_ids for e in examples], pad_id, left)
    labels, _ = pad_rows([e.labels for e in examples], IGNORE_INDEX, left)
    offset = ids.shape[1] - mask.sum(-1) if left else torch.zeros(len(examples), dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "offset": offset}


# ------------------------------------------------------------------------------------------- forward


def logits_of(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              prompt_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token logits [B, T, V] of any fact-world model, with padding handled.

    HF causal LMs get explicit position ids (left padding); the composed model computes its own;
    modules with a ``fact_logits`` method (heads on a frozen source) are called through it.
    prompt_lengths [B]: the real tokens of each row's prompt, which is all a fusion model with prompt
    memory lets its source read (without them it reads every given token, causally).
    """
    if hasattr(model, "fact_logits"):
        return model.fact_logits(input_ids, attention_mask)
    if type(model).__name__ == "LLMModulesForCausalLM":
        extra = {}
        if model.config.topology == "fusion" and model.config.memory == "prompt" and prompt_lengths is not None:
            extra = dict(source_input_ids=input_ids, **shared_source_inputs(attention_mask, prompt_lengths))
        return model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits
    return model(input_ids=input_ids, attention_mask=attention_mask,
                 position_ids=positions_from_padding(attention_mask)).logits


def causal_lm_loss_fn(model: nn.Module, pad_id: int) -> Callable[[list[Example]], torch.Tensor]:
    """examples -> the mean next-token loss of ``model`` over their labels (``model/loss.py``)."""

    def loss_fn(batch: list[Example]) -> torch.Tensor:
        tensors = collate(batch, pad_id)
        return causal_lm_loss(logits_of(model, tensors["input_ids"], tensors["attention_mask"]), tensors["labels"])

    return loss_fn


# -------------------------------------------------------------------------------------------- training


def train_loop(
    parameters: Sequence[nn.Parameter] | Sequence[dict],
    loss_fn: Callable[[list[Example]], torch.Tensor],
    examples: Sequence[Example],
    steps: int,
    batch_size: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
    evaluate: Callable[[], float] | None = None,
    eval_every: int = 100,
    patience: int = 0,
    stop_at: float | None = None,
    module: nn.Module | None = None,
    description: str = "train",
    warmup: int = 20,
    weight_decay: float = 0.0,
    progress: bool = True,
) -> TrainResult:
    """AdamW with warmup + cosine decay over shuffled mini-batches of ``examples``.

    ``evaluate`` (a validation accuracy, higher is better) runs every ``eval_every`` steps; with
    ``module`` the best-scoring state (of equal scores, the later) is restored at the end (early stopping;
    ``patience`` evaluations without improvement stop early, 0 = never stop early). A score >= ``stop_at`` ends
    training.
    """
    if not examples:
        raise ValueError("no training examples")
    generator = random.Random(seed)
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)),
    )
    order: list[int] = []
    losses: list[float] = []
    history: list[tuple[int, float]] = []
    best, best_step, best_state, bad = -1.0, 0, None, 0
    start = time.perf_counter()
    bar = tqdm(range(steps), desc=description, leave=False, disable=not progress, mininterval=1.0)
    for step in bar:
        if len(order) < batch_size:
            order += generator.sample(range(len(examples)), len(examples))
        batch, order = [examples[i] for i in order[:batch_size]], order[batch_size:]
        loss = loss_fn(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_gradients(optimizer.param_groups, 1.0)  # a call gate's group alone (training/optim.py)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if step % 20 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if evaluate is not None and ((step + 1) % eval_every == 0 or step + 1 == steps):
            score = evaluate()
            history.append((step + 1, score))
            if score >= best:
                # of equal scores the later checkpoint: it has trained longer for the same validation score (a small
                # validation set saturates early; keeping the first 100% kept a model of 100 steps, whose test score
                # then depended on chance)
                bad = 0 if score > best else bad + 1
                best, best_step = score, step + 1
                if module is not None:
                    best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
            else:
                bad += 1
            if patience and bad >= patience:
                break
            if stop_at is not None and score >= stop_at:
                break
    if module is not None and best_state is not None:
        module.load_state_dict(best_state)
    bar.close()
    return TrainResult(losses, history, best_step or steps, time.perf_counter() - start, len(losses))


def snapshot(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module)
