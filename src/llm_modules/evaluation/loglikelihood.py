"""Log-likelihood of continuations, and multiple-choice accuracy from it, for any causal LM.

Multiple-choice accuracy as lm-evaluation-harness defines it (``acc`` of a ``multiple_choice`` task): each
choice is scored by the summed log-probability of its tokens after the context, and the highest wins. This
module computes it on its own, for a plain Hugging Face causal LM or a composed model, so that our numbers
and lm-eval's can be checked against each other (``benchmarks/lm_eval_agreement.py``). The lm-eval model
type ``llm-modules`` (``lm_eval_model.py``) scores with :func:`score_continuations` too.

Tokenization follows lm-eval's for causal models (:func:`encode_pair`): the context's trailing spaces move
to the continuation, the whole text is tokenized once and split where the context's own tokens end.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from ..errors import LLMModulesError
from ..model.masks import positions_from_padding
from ..training.padding import pad_rows

# (input_ids [B, T], attention_mask [B, T], prompt_lengths [B]) -> extra forward inputs (a fusion model's source_*)
ExtraInputs = Callable[[torch.Tensor, torch.Tensor, list[int]], dict[str, torch.Tensor]]


def encode_pair(tokenizer: PreTrainedTokenizerBase, context: str, continuation: str,
                add_special_tokens: bool | None = None) -> tuple[list[int], list[int]]:
    """Token ids of ``context`` and of ``continuation`` after it, split where the context's own tokens end."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    options = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
    whole = tokenizer(context + continuation, **options).input_ids
    context_ids = tokenizer(context, **options).input_ids
    return list(context_ids), list(whole[len(context_ids):])


def _accepts(model, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


@torch.no_grad()
def score_continuations(
    model,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    pad_token_id: int,
    batch_size: int = 8,
    max_length: int | None = None,
    extra_inputs: ExtraInputs | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[tuple[float, bool]]:
    """Per (context ids, continuation ids): (sum of log p(continuation | context), whether greedy decoding
    gives the continuation). The model reads context + continuation[:-1].

    Requests whose inputs are the same (the one-token choices of one question) share one forward. Inputs are
    sorted by length and left padded into [B, T] batches with an attention mask and positions counted from the
    first real token; only the last positions' logits are computed where the model allows (``logits_to_keep``).
    ``max_length``: longer inputs lose tokens from the left (as lm-eval does). ``extra_inputs`` adds inputs per
    batch from the ids, mask and each row's context length (a fusion model's source side).
    """
    keys: dict[tuple[tuple[int, ...], int], int] = {}  # (input ids, context length) -> input index
    inputs: list[tuple[list[int], int]] = []
    which: list[int] = []
    for number, (context, continuation) in enumerate(requests):
        if not context or not continuation:
            raise LLMModulesError(f"request {number}: the context and the continuation need at least one token each")
        ids = list(context) + list(continuation[:-1])
        prompt = len(context)
        if max_length is not None and len(ids) > max_length:
            cut = len(ids) - max_length
            if cut >= prompt:
                raise LLMModulesError(f"request {number}: the continuation ({len(continuation)} tokens) does not fit "
                                      f"in max_length={max_length}")
            ids, prompt = ids[cut:], prompt - cut
        key = (tuple(ids), prompt)
        if key not in keys:
            keys[key] = len(inputs)
            inputs.append((ids, prompt))
        which.append(keys[key])
    device = next(model.parameters()).device
    keep_only = _accepts(model, "logits_to_keep")
    order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i][0]))
    users: dict[int, list[int]] = {}  # input index -> the requests it serves
    for number, i in enumerate(which):
        users.setdefault(i, []).append(number)
    results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    for start in range(0, len(order), batch_size):
        chunk = order[start: start + batch_size]
        ids, mask = pad_rows([inputs[i][0] for i in chunk], pad_token_id, left=True)
        # positions from the first real token (a plain HF forward does not derive them from left padding)
        positions = positions_from_padding(mask)
        scored = {i: len(inputs[i][0]) - inputs[i][1] + 1 for i in chunk}  # continuation positions per input
        kwargs = {"logits_to_keep": max(scored.values())} if keep_only else {}
        if extra_inputs is not None:
            kwargs.update(extra_inputs(ids, mask, [inputs[i][1] for i in chunk]))
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                       **{k: v.to(device) if torch.is_tensor(v) else v for k, v in kwargs.items()}).logits
        for row, i in enumerate(chunk):
            table = F.log_softmax(logits[row, -scored[i]:].float(), dim=-1)  # [n, V]
            for number in users[i]:
                target = torch.tensor(list(requests[number][1]), device=table.device)
                picked = table.gather(-1, target[:, None]).squeeze(-1)
                results[number] = (float(picked.sum()), bool(torch.equal(table.argmax(-1), target)))
        if progress is not None:
            progress(sum(len(users[i]) for i in chunk))
    return results


def choice_accuracy(
    model,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[tuple[str, Sequence[str], int]],
    batch_size: int = 8,
    delimiter: str = "",
) -> dict:
    """Multiple-choice accuracy: (context, choices, answer index) per question; each choice is scored as
    ``delimiter + choice`` after the context. Returns {accuracy, correct, n, predictions}."""
    requests, spans = [], []
    for context, choices, _ in questions:
        spans.append((len(requests), len(choices)))
        requests += [encode_pair(tokenizer, context, delimiter + choice) for choice in choices]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    scores = score_continuations(model, requests, pad, batch_size)
    predictions = [max(range(n), key=lambda k: scores[start + k][0]) for start, n in spans]
    correct = sum(int(p == answer) for p, (_, _, answer) in zip(predictions, questions))
    return {"accuracy": correct / max(1, len(questions)), "correct": correct, "n": len(questions),
            "predictions": predictions}
