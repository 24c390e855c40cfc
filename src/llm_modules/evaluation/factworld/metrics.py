"""Fact-world metrics: greedy answer accuracy (seen/unseen answer word), format adherence,
teacher-forced answer-token accuracy, the leak probe, and the source's recall.

Every function takes any fact-world model (see ``lm.logits_of``): HF causal LMs, the composed
model, or a head on a frozen source.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from .lm import Example, collate, encode_recall, encode_trace, logits_of
from .world import BEGIN_SOLUTION, BEGIN_THOUGHT, END_SOLUTION, END_THOUGHT, Fact, FactWorld

_SOLUTION = re.compile(re.escape(BEGIN_SOLUTION) + r"(.*?)" + re.escape(END_SOLUTION), re.S)


def parse_answer(text: str) -> str | None:
    """The text between the solution markers, stripped; None when absent."""
    match = _SOLUTION.search(text)
    return match.group(1).strip() if match else None


def format_ok(text: str) -> bool:
    """Reasoning and answer present, in order: thought markers, then solution markers."""
    marks = [text.find(m) for m in (BEGIN_THOUGHT, END_THOUGHT, BEGIN_SOLUTION, END_SOLUTION)]
    return all(m >= 0 for m in marks) and marks == sorted(marks)


@torch.no_grad()
def teacher_forced(model: nn.Module, examples: Sequence[Example], pad_id: int, batch_size: int = 64,
                   span: str = "knowledge") -> list[bool]:
    """Per example: are all tokens of ``span`` the argmax given the gold prefix? ``span``: "knowledge" (the
    recalled value and the skill's output, ``Example.knowledge``) or "answer" (the recalled value alone)."""
    model.eval()
    results: list[bool] = []
    for start in range(0, len(examples), batch_size):
        chunk = list(examples[start: start + batch_size])
        batch = collate(chunk, pad_id)
        prompts = torch.tensor([e.prompt_length for e in chunk])
        predicted = logits_of(model, batch["input_ids"], batch["attention_mask"], prompts).argmax(-1)  # [B, T]
        for row, e in enumerate(chunk):
            results.append(all(int(predicted[row, k - 1]) == e.input_ids[k] for k in getattr(e, span)))
    return results


@torch.no_grad()
def leak_probe(
    model: nn.Module,
    examples: Sequence[Example],
    pad_id: int,
    vocab_size: int,
    seed: int = 0,
    batch_size: int = 64,
) -> tuple[list[bool], list[float]]:
    """The leak probe. For each knowledge token k (``Example.knowledge``), every token from k on (k itself and all
    later ones) is replaced by a random token before predicting k. Per example: (are all answer tokens still the argmax, the largest change
    of an answer-position log-probability that the scrambling caused).

    A causal model scores exactly its teacher-forced accuracy with a change of 0; a model that reads later
    positions moves (the change) and collapses where it relied on them (the accuracy).
    """
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    correct: list[bool] = []
    shifts: list[float] = []
    for start in range(0, len(examples), batch_size):
        chunk = list(examples[start: start + batch_size])
        batch = collate(chunk, pad_id)
        ids, mask = batch["input_ids"], batch["attention_mask"]  # [B, T]
        prompts = torch.tensor([e.prompt_length for e in chunk])
        plain = logits_of(model, ids, mask, prompts).float().log_softmax(-1)  # [B, T, V]
        right = torch.ones(len(chunk), dtype=torch.bool)
        shift = torch.zeros(len(chunk))
        for j in range(max(len(e.knowledge) for e in chunk)):
            scrambled = ids.clone()
            for row, e in enumerate(chunk):
                if j < len(e.knowledge):
                    k = e.knowledge[j]
                    n = len(e.input_ids) - k
                    scrambled[row, k: k + n] = torch.randint(0, vocab_size, (n,), generator=generator)
            logp = logits_of(model, scrambled, mask, prompts).float().log_softmax(-1)
            for row, e in enumerate(chunk):
                if j < len(e.knowledge):
                    k = e.knowledge[j]
                    right[row] &= int(logp[row, k - 1].argmax()) == e.input_ids[k]
                    shift[row] = max(float(shift[row]), float((logp[row, k - 1] - plain[row, k - 1]).abs().max()))
        correct.extend(bool(c) for c in right)
        shifts.extend(float(x) for x in shift)
    return correct, shifts


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    prompts: Sequence[list[int]],
    pad_id: int,
    stop_ids: Sequence[int],
    max_new_tokens: int = 32,
    batch_size: int = 64,
) -> list[list[int]]:
    """Greedy continuation of each prompt (left-padded batches; whole prefix recomputed each step, which
    also serves models without a KV cache, the leaky bridge and heads on a frozen source)."""
    model.eval()
    out: list[list[int]] = []
    stops = torch.tensor(list(stop_ids))
    for start in range(0, len(prompts), batch_size):
        chunk = [Example(list(p), list(p)) for p in prompts[start: start + batch_size]]
        batch = collate(chunk, pad_id, left=True)
        ids, mask = batch["input_ids"], batch["attention_mask"]  # [B, T]
        prompt_lengths = torch.tensor([len(e.input_ids) for e in chunk])
        done = torch.zeros(len(chunk), dtype=torch.bool)
        new: list[torch.Tensor] = []
        for _ in range(max_new_tokens):
            token = logits_of(model, ids, mask, prompt_lengths)[:, -1].argmax(-1)  # [B]
            token = torch.where(done, torch.full_like(token, pad_id), token)
            new.append(token)
            done |= torch.isin(token, stops)
            ids = torch.cat([ids, token[:, None]], 1)
            mask = torch.cat([mask, (~done | torch.isin(token, stops)).long()[:, None]], 1)
            if bool(done.all()):
                break
        generated = torch.stack(new, 1) if new else torch.zeros(len(chunk), 0, dtype=torch.long)
        for row in generated.tolist():
            keep = []
            for t in row:
                if t == pad_id:
                    break
                keep.append(t)
                if t in stop_ids:
                    break
            out.append(keep)
    return out


@dataclass
class TraceScores:
    """Scores of one model on a list of facts in the chat/trace format."""

    accuracy: float
    accuracy_seen: float
    accuracy_unseen: float
    format_adherence: float
    teacher_forced: float
    leak_probe: float
    leak_shift: float  # the largest change of an answer log-probability when the future is scrambled
    n_seen: int
    n_unseen: int
    outputs: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "outputs"}


def _mean(values: Sequence[bool | float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


def evaluate_traces(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    world: FactWorld,
    facts: Sequence[Fact],
    generate: bool = True,
    probe_leak: bool = True,
    max_new_tokens: int = 40,
    seed: int = 0,
    given_fact: bool = False,
) -> TraceScores:
    """Greedy answers (parsed from the solution) split by whether the final answer occurs in transfer
    data, format adherence, teacher-forced accuracy of the knowledge tokens in the thought, and the leak probe.

    ``given_fact``: generation starts after the gold thought's recalled fact (the skill skyline: the model is told
    the fact and must do the rest)."""
    examples = [encode_trace(tokenizer, world, f) for f in facts]
    pad = tokenizer.pad_token_id
    forced = teacher_forced(model, examples, pad)
    probe, shifts = leak_probe(model, examples, pad, len(tokenizer), seed=seed) if probe_leak else ([], [])
    seen = [world.answer_seen(f) for f in facts]
    right: list[bool] = []
    formats: list[bool] = []
    outputs: list[dict] = []
    if generate:
        stops = [tokenizer.convert_tokens_to_ids(END_SOLUTION), tokenizer.convert_tokens_to_ids("<|im_end|>"),
                 tokenizer.eos_token_id]
        prompts = [e.input_ids[: e.fact_end if given_fact else e.prompt_length] for e in examples]
        generated = greedy_generate(model, prompts, pad, stops, max_new_tokens)
        for fact, example, prompt, ids in zip(facts, examples, prompts, generated):
            given = prompt[example.prompt_length:]  # the gold thought a model "given the fact" was prompted with
            text = tokenizer.decode(given + ids, skip_special_tokens=False)
            answer = parse_answer(text)
            gold = world.final_answer(fact)
            right.append(answer == gold)
            formats.append(format_ok(text))
            outputs.append({"fact": fact.key, "gold": gold, "answer": answer, "output": text})
    return TraceScores(
        accuracy=_mean(right),
        accuracy_seen=_mean([r for r, s in zip(right, seen) if s]),
        accuracy_unseen=_mean([r for r, s in zip(right, seen) if not s]),
        format_adherence=_mean(formats),
        teacher_forced=_mean(forced),
        leak_probe=_mean(probe),
        leak_shift=max(shifts, default=float("nan")),
        n_seen=sum(seen),
        n_unseen=len(seen) - sum(seen),
        outputs=outputs,
    )


@torch.no_grad()
def target_skill(model: nn.Module, tokenizer: PreTrainedTokenizerBase, world: FactWorld) -> float:
    """The target's own skill: its greedy answer accuracy on ``world.skill_probe()`` when prompted with the gold
    thought up to the recalled fact (the skill skyline's prompt, on background entities)."""
    return evaluate_traces(model, tokenizer, world, world.skill_probe(), probe_leak=False, given_fact=True).accuracy


def source_recall(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, world: FactWorld, facts: Sequence[Fact],
    where: str = "trace",
) -> float:
    """The source's recall of the fact: teacher-forced argmax of the value's token(s).

    where="trace": at the exact point of the transfer trace where the value is recalled (lesson (b)); in a world
    whose ``source_recall_span`` is "statement", every token of the restated fact, the name copied from the
    question included;
    where="own": after its own brief format "Remember: Velmora's capital is".
    """
    if where == "trace":
        examples = [encode_trace(tokenizer, world, f) for f in facts]
        span = world.source_recall_span
    elif where == "own":
        examples = [encode_recall(tokenizer, world, f) for f in facts]
        span = "answer"
    else:
        raise ValueError(f"where must be 'trace' or 'own', got {where!r}")
    return _mean(teacher_forced(model, examples, tokenizer.pad_token_id, span=span))


@torch.no_grad()
def own_format_accuracy(model: nn.Module, tokenizer: PreTrainedTokenizerBase, world: FactWorld,
                        facts: Sequence[Fact], composed: bool = False) -> float:
    """Greedy generation after the own-format prompt ("Remember: Velmora's capital is"; with ``composed`` the
    composition world's question in that form): do the first generated words say the answer?"""
    if not facts:
        return float("nan")
    prompts = [encode_recall(tokenizer, world, f, composed) for f in facts]
    generated = greedy_generate(
        model, [e.input_ids[: e.prompt_length] for e in prompts], tokenizer.pad_token_id,
        [tokenizer.eos_token_id], max_new_tokens=max(len(e.answer) for e in prompts) + 1,
    )
    right = []
    for fact, ids in zip(facts, generated):
        gold = world.own_prompt(fact, composed)[1]
        said = tokenizer.decode(ids, skip_special_tokens=True).replace(".", " ").split()
        right.append(said[: len(gold.split())] == gold.split())
    return _mean(right)


__all__ = [
    "TraceScores",
    "evaluate_traces",
    "format_ok",
    "greedy_generate",
    "own_format_accuracy",
    "parse_answer",
    "source_recall",
    "teacher_forced",
]
