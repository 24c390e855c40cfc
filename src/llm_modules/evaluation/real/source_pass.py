"""One pass of the frozen source over every question of the table, computed once and reused by every row.

The source reads each question's letter text once (no answer appended: every scored answer is the next token).
Its last-layer states (the layer the bridge and the fusion blocks read, ``hidden_states[-1]``) go into the
source-state cache (``training/cache.py``: sharded, fingerprinted, resumable after a kill), and its answer is
read from the same states through its own output head: the ``source_alone`` row and the KD teacher. After
the pass no row loads the source again.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ...errors import LLMModulesError
from ...model.loading import load_causal_lm, load_tokenizer
from ...model.processing import adds_bos_token
from ...training.atomic import atomic_write_json
from ...training.cache import CacheFields, SourceStateCache, tokenizer_fingerprint, weights_fingerprint
from .questions import Question, answer_tokens

LETTERS_FILE = "source_letters.json"
TEMPLATE = "letters-plain-v1"  # what the cached states were computed on (questions.Question.text)


def source_ids(tokenizer, text: str) -> list[int]:
    """The source's ids for ``text``, as ``CompositionProcessor`` gives them (its BOS in front when it expects one)."""
    ids = list(tokenizer(text, add_special_tokens=False).input_ids)
    return [tokenizer.bos_token_id, *ids] if adds_bos_token(tokenizer) else ids


def letter_token_ids(tokenizer, count: int) -> list[int]:
    """Ids of " A", " B", ... (each must be one token)."""
    ids = []
    for piece in answer_tokens(count):
        encoded = tokenizer(piece, add_special_tokens=False).input_ids
        if len(encoded) != 1:
            raise LLMModulesError(f"{piece!r} is {len(encoded)} tokens for this tokenizer; the letter format needs one")
        ids.append(encoded[0])
    return ids


@dataclass
class SourcePass:
    """The pass's products: the cache of states, the source's letter logits per question id, and its cost."""

    cache: SourceStateCache
    tokenizer: object
    letters: dict[str, list[float]]
    seconds: float
    tokens: int
    dtype: str

    def states(self, question: Question) -> torch.Tensor:
        """[S, d_s] float32: the source's last-layer states over the question's text."""
        return self.cache.get(source_ids(self.tokenizer, question.text)).float()


def run_source_pass(source: str, questions: list[Question], folder: str | Path, dtype: str | None = None,
                    batch_size: int = 4, progress: bool = True) -> SourcePass:
    """Compute (or reuse) the cache for ``questions`` in ``folder``; returns the pass (resumable: finished shards stay)."""
    folder = Path(folder)
    tokenizer = load_tokenizer(source, "source")
    examples = [source_ids(tokenizer, q.text) for q in questions]
    record_path = folder / "pass.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {"seconds": 0.0}
    letters_path = folder / LETTERS_FILE
    letters = json.loads(letters_path.read_text()) if letters_path.exists() else {}
    model = None
    needed = [q for q in questions if q.id not in letters]
    chosen = record.get("dtype")
    if needed or not letters_path.exists():
        model = load_causal_lm("source", source, dtype=dtype).eval()
        chosen = str(next(model.parameters()).dtype).removeprefix("torch.")
    fields = CacheFields(source=str(source), source_revision=None, source_weights=weights_fingerprint(source),
                         source_layer=-1, source_dtype=chosen, tokenizer=tokenizer_fingerprint(tokenizer),
                         template=TEMPLATE, max_length=max(map(len, examples)), hidden_size=_width(source, model),
                         dtype="float32")
    cache = SourceStateCache.open(folder, fields)
    cache.consolidate(log=lambda line: print(line, file=sys.stderr))
    if model is not None:
        started = time.perf_counter()
        body = model.base_model

        def states_fn(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return body(input_ids=ids, attention_mask=mask).last_hidden_state  # = hidden_states[-1] (after the norm)

        missing = cache.missing(examples)
        todo = sum(len(examples[i]) for i in missing)
        print(f"source pass: {len(missing)} of {len(examples)} prompts to read ({todo:,} tokens, {chosen})", file=sys.stderr)
        with torch.inference_mode():
            cache.build(examples, states_fn, batch_size=batch_size, shard_bytes=32 << 20, progress=progress)
        cache.consolidate(log=lambda line: print(line, file=sys.stderr))
        head = model.get_output_embeddings()
        ids = letter_token_ids(tokenizer, max(len(q.choices) for q in questions))
        rows = head.weight[ids].float()  # [letters, d_s]
        bias = head.bias[ids].float() if getattr(head, "bias", None) is not None else None
        for question, example in zip(questions, examples):
            last = cache.get(example)[-1].float()
            scores = rows[: len(question.choices)] @ last
            letters[question.id] = (scores + (bias[: len(question.choices)] if bias is not None else 0)).tolist()
        record = {"seconds": record["seconds"] + time.perf_counter() - started, "dtype": chosen,
                  "tokens": sum(map(len, examples)), "prompts": len(examples)}
        atomic_write_json(record_path, record)
        atomic_write_json(letters_path, letters)
        del model
    return SourcePass(cache, tokenizer, letters, record["seconds"], record.get("tokens", sum(map(len, examples))),
                      chosen or "unknown")


def _width(source: str, model) -> int:
    if model is not None:
        return int(model.config.get_text_config().hidden_size)
    from ...model.loading import load_config

    return int(load_config("source", source).get_text_config().hidden_size)
