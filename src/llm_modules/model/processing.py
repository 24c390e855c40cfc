"""Two tokenizers, one text: what the source reads and which of its tokens each target token may read.

The fusion topology keeps the target's own tokenizer, so the source reads the same *text* through its
own tokenizer. ``CompositionProcessor`` (in the spirit of HF's multimodal processors) renders a
conversation once and gives each model its ids, plus the alignment that keeps the composition causal.

The causal law across tokenizers: target token i ends at character e_i; it may read the
source's view of ``text[:e_i]`` and nothing else. With byte-pair tokenizers the source's tokenization of
a prefix is *not* always a prefix of its tokenization of the whole text ("the" + "re" is " there" once
the text goes on), so "source tokens that end at or before e_i" in the full tokenization would leak
whether the word continues. We therefore give target token i exactly ``tok_source(text[:e_i])``:

- the first n_i tokens of the full tokenization that it shares (``source_counts[i] = n_i``), and
- the tokens where the two differ (its *tail*: usually empty, one or two tokens inside a word), appended
  after the main tokens as extra source positions that only target token i reads (``source_groups``).

A tail token reads the first n_i main tokens and the tail tokens before it, at positions n_i, n_i + 1...,
so its state is exactly the state the source computes when it reads ``text[:e_i]`` alone; generation
(which only ever has the prefix) computes the same states, so cached decoding equals recomputation.

With one tokenizer for both (``shared``), source token j is target token j: n_i = i + 1, no tails, and
positions stand in for character offsets. With ``memory="prompt"`` the source reads a fixed prompt text;
its tokens are read by target tokens that end at or after them (the prompt is complete, so it has no tails).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import BatchEncoding, PreTrainedTokenizerBase

from ..errors import LLMModulesError

MEMORIES = ("prompt", "sequence")
MAIN = -1  # source_groups value of a main (shared) source token


def vocabulary_differences(
    a: PreTrainedTokenizerBase,
    b: PreTrainedTokenizerBase,
    a_rows: int | None = None,
    b_rows: int | None = None,
    limit: int = 3,
) -> list[tuple[int, str | None, str | None]]:
    """The first ``limit`` ids that both output heads can produce but that name different tokens: (id, a's token,
    b's token; None where a tokenizer holds no token at that id). Empty: one vocabulary.

    ``a_rows`` / ``b_rows`` are the heads' sizes (``config.vocab_size``; default: each tokenizer's length). Only ids
    below both count: a token one tokenizer appends past the other's head (transformers 5 loads a Qwen2 folder
    without ``<|endoftext|>`` as ``Qwen2Tokenizer`` with that token appended) is never produced by the other head.
    """
    rows = min(len(a) if a_rows is None else a_rows, len(b) if b_rows is None else b_rows)
    by_id_a = {i: t for t, i in a.get_vocab().items() if i < rows}
    by_id_b = {i: t for t, i in b.get_vocab().items() if i < rows}
    differences = []
    for index in sorted(set(by_id_a) | set(by_id_b)):
        if by_id_a.get(index) != by_id_b.get(index):
            differences.append((index, by_id_a.get(index), by_id_b.get(index)))
            if len(differences) == limit:
                break
    return differences


def describe_differences(differences: list[tuple[int, str | None, str | None]], a: str, b: str) -> str:
    """``vocabulary_differences`` for an error message: ``id 7: target 'ab', source 'ba'; ...``."""
    return "; ".join(f"id {index}: {a} {token_a!r}, {b} {token_b!r}" for index, token_a, token_b in differences)


def same_tokenizer(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> bool:
    """True when each can read the other's ids: every id both hold names the same token (ids past the shorter one's
    end do not count, see ``vocabulary_differences``) and both give the same ids on probe texts."""
    if a is b:
        return True
    if vocabulary_differences(a, b, limit=1):
        return False
    probes = ["Hello world, it's 2024!", "  two  spaces\nand\ttabs", "naïve café ünïcödé 中文", "<|im_start|>user\nhi"]
    return all(a(p, add_special_tokens=False).input_ids == b(p, add_special_tokens=False).input_ids for p in probes)


def adds_bos_token(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Does the tokenizer put a BOS token in front by default (Llama, Gemma)? Then the source expects one."""
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a").input_ids
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class RowAlignment:
    """One row: target ids and, for the source, main tokens then tail tokens (lists, unpadded).

    target_ids [T]; source_ids [S]; source_positions [S] (the position each source token has in the
    sequence it belongs to); source_groups [S] (MAIN, or the target index whose tail it is);
    source_counts [T] (how many main tokens target i reads).
    """

    target_ids: list[int]
    source_ids: list[int] = field(default_factory=list)
    source_positions: list[int] = field(default_factory=list)
    source_groups: list[int] = field(default_factory=list)
    source_counts: list[int] = field(default_factory=list)

    @property
    def main_length(self) -> int:
        return sum(1 for g in self.source_groups if g == MAIN)


class CompositionProcessor:
    """Target tokenizer + source tokenizer -> ``input_ids``/``attention_mask`` for the target and
    ``source_input_ids``/``source_attention_mask``/``source_position_ids``/``source_groups``/``source_counts``.

    ``processor(texts)`` tokenizes text; ``processor.align_ids(input_ids, attention_mask)`` derives the
    source side from the target's ids alone (decoding them), so one-tokenizer tools can drive a fusion model.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        source_tokenizer: PreTrainedTokenizerBase | None = None,
        memory: str = "sequence",
        shared: bool | None = None,
    ) -> None:
        if memory not in MEMORIES:
            raise LLMModulesError(f"memory={memory!r} is not supported; choose one of {', '.join(MEMORIES)}")
        self.tokenizer = tokenizer
        self.source_tokenizer = source_tokenizer if source_tokenizer is not None else tokenizer
        self.memory = memory
        self.shared = same_tokenizer(tokenizer, self.source_tokenizer) if shared is None else shared
        if not self.shared and not (tokenizer.is_fast and self.source_tokenizer.is_fast):
            raise LLMModulesError("two different tokenizers need fast (Rust) tokenizers for character offsets")
        self.source_bos = None if self.shared or not adds_bos_token(self.source_tokenizer) else self.source_tokenizer.bos_token_id

    # ----------------------------------------------------------------------------------- one row
    def _source_tokens(self, text: str) -> tuple[list[int], list[int]]:
        """The source's ids and character ends for ``text`` (with its BOS, ending at 0, when it expects one)."""
        encoded = self.source_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, ends = list(encoded["input_ids"]), [end for _, end in encoded["offset_mapping"]]
        if self.source_bos is not None:
            ids, ends = [self.source_bos, *ids], [0, *ends]
        return ids, ends

    def _source_prefixes(self, texts: list[str]) -> list[list[int]]:
        """Source ids of many prefixes at once (one batched Rust call)."""
        encoded = self.source_tokenizer(texts, add_special_tokens=False)["input_ids"]
        if self.source_bos is not None:
            return [[self.source_bos, *ids] for ids in encoded]
        return [list(ids) for ids in encoded]

    def align_row(self, text: str, target_ids: list[int], target_ends: list[int], source_text: str | None = None,
                  ) -> RowAlignment:
        """Alignment of one row given the target's ids and their character ends in ``text``.

        ``source_text``: what the source reads with prompt memory (a prefix of ``text``); None reads along.
        """
        row = RowAlignment(list(target_ids))
        if self.memory == "prompt" and source_text is None:
            source_text = text  # generating: the whole given text is the prompt
        if self.shared:
            whole = source_text is None or source_text == text
            return _shared_row(target_ids, len(target_ids) if whole else _shared_prompt_length(target_ends, len(source_text)))
        if source_text is not None:  # prompt memory: one fixed tokenization, read by the tokens that end after it
            if not text.startswith(source_text):
                raise LLMModulesError("with memory='prompt' the source text must be a prefix of the target text")
            ids, ends = self._source_tokens(source_text)
            row.source_ids, row.source_positions, row.source_groups = ids, list(range(len(ids))), [MAIN] * len(ids)
            row.source_counts = [sum(1 for end in ends if end <= e) for e in target_ends]
            return row
        ids, _ = self._source_tokens(text)
        row.source_ids, row.source_positions, row.source_groups = list(ids), list(range(len(ids))), [MAIN] * len(ids)
        prefixes = self._source_prefixes([text[:e] for e in target_ends])
        for i, prefix in enumerate(prefixes):
            shared = _common_prefix(prefix, ids)
            row.source_counts.append(shared)
            for k, token in enumerate(prefix[shared:]):  # the tail only target i reads
                row.source_ids.append(token)
                row.source_positions.append(shared + k)
                row.source_groups.append(i)
        return row

    def target_ends(self, text: str, target_ids: list[int]) -> list[int]:
        """Character end of each target token in ``text`` (decoded from ``target_ids``).

        Offsets when re-tokenizing ``text`` gives back ``target_ids`` (the usual case), otherwise the length
        of each decoded prefix (exact for any id sequence, slower).
        """
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        if list(encoded["input_ids"]) == list(target_ids):
            return [end for _, end in encoded["offset_mapping"]]
        decoded = self.tokenizer.batch_decode([target_ids[: i + 1] for i in range(len(target_ids))],
                                              skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return [len(piece) for piece in decoded]

    def decode(self, target_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(target_ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    # -------------------------------------------------------------------------------------- batches
    def __call__(
        self,
        text: str | list[str],
        source_text: str | list[str] | None = None,
        padding_side: str = "left",
        return_tensors: str = "pt",
    ) -> BatchEncoding:
        """Tokenize ``text`` for both models. ``source_text`` (prompt memory): what the source reads, a prefix of
        each text; by default the source reads the whole text (the whole prompt, when generating)."""
        texts = [text] if isinstance(text, str) else list(text)
        sources = [source_text] if isinstance(source_text, str) else (source_text or [None] * len(texts))
        if len(sources) != len(texts):
            raise LLMModulesError(f"{len(texts)} texts but {len(sources)} source texts")
        rows = []
        for one, source in zip(texts, sources):
            encoded = self.tokenizer(one, add_special_tokens=False, return_offsets_mapping=True)
            ends = [end for _, end in encoded["offset_mapping"]]
            rows.append(self.align_row(one, list(encoded["input_ids"]), ends, source))
        return BatchEncoding(self.pad(rows, padding_side), tensor_type=return_tensors)

    def apply_chat_template(self, conversations, add_generation_prompt: bool = True, **kwargs) -> BatchEncoding:
        """Render with the *target's* chat template (the composed model speaks it) and tokenize for both."""
        single = conversations and isinstance(conversations[0], dict)
        batch = [conversations] if single else conversations
        texts = [self.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=add_generation_prompt)
                 for c in batch]
        return self(texts, **kwargs)

    def align_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  padding_side: str | None = None, prompt_lengths: Sequence[int] | None = None
                  ) -> dict[str, torch.Tensor]:
        """The source side for target ids alone: decode each row, then align as :meth:`__call__` would.

        input_ids, attention_mask: [B, T]. Returns the ``source_*`` tensors (the target ids are not repeated).
        Rows keep their padding: ``source_counts`` is [B, T] in the same columns as ``input_ids``.
        padding_side: where the source rows are padded; None: the side ``attention_mask`` pads on, so that with one
        tokenizer each source token sits in its target token's column (a mixture head reads the source by column).
        prompt_lengths: [B] with ``memory="prompt"``, how many of each row's real tokens are the prompt the
        source reads (a context whose continuation is scored); default: all of them (a prompt to continue).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if padding_side is None:
            padding_side = padding_side_of(attention_mask)
        if prompt_lengths is not None and len(prompt_lengths) != input_ids.shape[0]:
            raise LLMModulesError(f"{input_ids.shape[0]} rows but {len(prompt_lengths)} prompt lengths")
        rows = []
        for b, (ids, mask) in enumerate(zip(input_ids.tolist(), attention_mask.tolist())):
            real = [t for t, m in zip(ids, mask) if m]
            prompt = None
            if self.memory == "prompt" and prompt_lengths is not None:
                prompt = int(prompt_lengths[b])
                if not 0 < prompt <= len(real):
                    raise LLMModulesError(f"row {b}: prompt length {prompt} is not within its {len(real)} tokens")
            if self.shared:  # the source reads every given token (or the prompt's)
                row = _shared_row(real, len(real) if prompt is None else prompt)
            else:
                text = self.decode(real)
                source_text = None if prompt is None else self.decode(real[:prompt])
                row = self.align_row(text, real, self.target_ends(text, real), source_text)
            rows.append(row)
        padded = self.pad(rows, padding_side)
        # put source_counts back into the columns of input_ids (which may be padded on either side)
        counts = torch.zeros_like(input_ids)
        for b, (row, mask) in enumerate(zip(rows, attention_mask)):
            counts[b, mask.bool()] = torch.as_tensor(row.source_counts, dtype=counts.dtype)
        padded["source_counts"] = counts
        padded.pop("input_ids"), padded.pop("attention_mask")
        return {k: torch.as_tensor(v, device=input_ids.device) for k, v in padded.items()}

    def pad(self, rows: list[RowAlignment], padding_side: str = "left") -> dict[str, list[list[int]]]:
        """Pad rows to one length. Tail groups index the *padded* target columns."""
        if padding_side not in ("left", "right"):
            raise LLMModulesError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        source_pad = self.source_tokenizer.pad_token_id
        source_pad = source_pad if source_pad is not None else (self.source_tokenizer.eos_token_id or 0)
        length = max(len(r.target_ids) for r in rows)
        source_length = max(1, max(len(r.source_ids) for r in rows))
        out: dict[str, list[list[int]]] = {k: [] for k in (
            "input_ids", "attention_mask", "source_input_ids", "source_attention_mask", "source_position_ids",
            "source_groups", "source_counts")}
        for row in rows:
            pad, source_padding = length - len(row.target_ids), source_length - len(row.source_ids)
            shift = pad if padding_side == "left" else 0
            groups = [g if g == MAIN else g + shift for g in row.source_groups]

            def place(values: list[int], fill: int, n: int) -> list[int]:
                return [fill] * n + values if padding_side == "left" else values + [fill] * n

            out["input_ids"].append(place(row.target_ids, pad_id, pad))
            out["attention_mask"].append(place([1] * len(row.target_ids), 0, pad))
            out["source_counts"].append(place(row.source_counts, 0, pad))
            out["source_input_ids"].append(place(row.source_ids, source_pad, source_padding))
            out["source_attention_mask"].append(place([1] * len(row.source_ids), 0, source_padding))
            out["source_position_ids"].append(place(row.source_positions, 0, source_padding))
            out["source_groups"].append(place(groups, MAIN, source_padding))
        return out


def padding_side_of(attention_mask: torch.Tensor) -> str:
    """``"right"`` when some row of ``attention_mask`` [B, T] has padding after a real token, else ``"left"``."""
    valid = attention_mask.bool()
    return "right" if bool((~valid[:, 1:] & valid[:, :-1]).any()) else "left"


def _shared_row(target_ids: Sequence[int], count: int) -> RowAlignment:
    """One tokenizer: the source reads the first ``count`` target tokens, token i the first min(i + 1, count)."""
    return RowAlignment(list(target_ids), list(target_ids[:count]), list(range(count)), [MAIN] * count,
                        [min(i + 1, count) for i in range(len(target_ids))])


def _shared_prompt_length(target_ends: list[int], prompt_chars: int) -> int:
    """With one tokenizer and prompt memory: how many leading tokens lie inside the prompt."""
    return sum(1 for end in target_ends if end <= prompt_chars)


def shared_source_inputs(attention_mask: torch.Tensor, prompt_lengths: torch.Tensor | None = None
                         ) -> dict[str, torch.Tensor]:
    """One tokenizer for both models, source tokens in the target's own columns: the source_* inputs without ids.

    attention_mask: [B, T] (left or right padding). prompt_lengths: [B] real tokens the source reads
    (``memory="prompt"``); None: it reads every token (``memory="sequence"``). Pass the source's states
    (or ``source_input_ids`` = the target's ids) alongside.
    """
    valid = attention_mask.bool()
    rank = valid.long().cumsum(-1) - 1  # [B, T] index among real tokens
    source_valid = valid if prompt_lengths is None else valid & (rank < prompt_lengths[:, None])
    reads = source_valid.long().sum(-1, keepdim=True)  # [B, 1]
    return {
        "source_attention_mask": source_valid.long(),
        "source_position_ids": rank.clamp(min=0),
        "source_groups": torch.full_like(rank, MAIN),
        "source_counts": torch.minimum(rank + 1, reads).clamp(min=0) * valid,
    }


# --------------------------------------------------------------------------------------- masks
def source_self_mask(source_attention_mask: torch.Tensor, source_groups: torch.Tensor,
                     source_counts_of_groups: torch.Tensor) -> torch.Tensor:
    """Which source tokens each source token reads, when tails exist: bool [B, S, S].

    Main tokens read the main tokens before them (causal, padding excluded); a tail token of target i
    reads the first n_i main tokens and the tail tokens of the same target before it (and itself).
    source_counts_of_groups: [B, S] n_i of each tail token's target (unused for main tokens).
    """
    valid = source_attention_mask.bool()  # [B, S]
    main = source_groups == MAIN
    rank = (main & valid).long().cumsum(-1) - 1  # index among main tokens
    order = torch.arange(source_groups.shape[1], device=source_groups.device)
    earlier = order[None, :, None] >= order[None, None, :]  # [1, S(query), S(key)]: key at or before query
    key_main = (main & valid)[:, None, :]
    main_reads = main[:, :, None] & key_main & earlier
    tail_reads_main = (~main)[:, :, None] & key_main & (rank[:, None, :] < source_counts_of_groups[:, :, None])
    same_group = (source_groups[:, :, None] == source_groups[:, None, :]) & (~main)[:, :, None] & (~main)[:, None, :]
    tail_reads_tail = same_group & earlier & valid[:, None, :]
    allowed = main_reads | tail_reads_main | tail_reads_tail
    return allowed | torch.eye(source_groups.shape[1], dtype=torch.bool, device=allowed.device)[None]


def cross_attention_from_counts(
    source_attention_mask: torch.Tensor, source_groups: torch.Tensor, source_counts: torch.Tensor,
    target_columns: torch.Tensor | None = None, leaky: bool = False,
) -> torch.Tensor:
    """Which source tokens each target token reads: bool [B, T, S].

    source_counts: [B, T] main tokens target i reads; target_columns: [T] the padded column of each query
    (default 0..T-1) to match tail groups. leaky: every real source token (the released padding-only mask).
    """
    valid = source_attention_mask.bool()
    main = (source_groups == MAIN) & valid
    if leaky:
        allowed = valid[:, None, :].expand(-1, source_counts.shape[1], -1)
    else:
        rank = main.long().cumsum(-1) - 1
        reads_main = main[:, None, :] & (rank[:, None, :] < source_counts[:, :, None])
        columns = target_columns if target_columns is not None else torch.arange(source_counts.shape[1],
                                                                                 device=source_counts.device)
        reads_tail = (source_groups[:, None, :] == columns[None, :, None]) & valid[:, None, :] & ~main[:, None, :]
        allowed = reads_main | reads_tail
    # a query that may read nothing (padding, or a first token before any source token ends) reads nothing:
    # the caller zeroes its attention output instead of letting a softmax over nothing make NaNs
    return allowed


def group_counts(source_groups: torch.Tensor, source_counts: torch.Tensor) -> torch.Tensor:
    """n_i of each source token's target (0 for main tokens): [B, S]."""
    index = source_groups.clamp(min=0)
    return torch.gather(source_counts, 1, index) * (source_groups != MAIN)


class SourceStream:
    """Reading along while generating with two tokenizers (``memory="sequence"``).

    Keeps, per row, the target ids so far and the source ids currently valid with their slots in the
    source's cache. Each step decodes the text, tokenizes it for the source, keeps the tokens it shares
    with what the source already read, retires the others (their slots stop being read) and returns the
    new tokens with their positions. The valid slots then are exactly ``tok_source(text so far)``.
    """

    def __init__(self, processor: CompositionProcessor, target_ids: list[list[int]],
                 source_ids: list[list[int]], source_slots: list[list[int]]) -> None:
        self.processor = processor
        self.target_ids = [list(r) for r in target_ids]
        self.source_ids = [list(r) for r in source_ids]
        self.source_slots = [list(r) for r in source_slots]

    def step(self, new_target_ids: list[list[int]], next_slot: int) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
        """Append each row's new target ids. Returns per row (new source ids, their positions, retired slots);
        new tokens will occupy slots next_slot, next_slot + 1, ... in order (rows padded to the longest)."""
        news, positions, retired = [], [], []
        for row, new in enumerate(new_target_ids):
            self.target_ids[row].extend(new)
            text = self.processor.decode(self.target_ids[row])
            ids, _ = self.processor._source_tokens(text)
            keep = _common_prefix(ids, self.source_ids[row])
            retired.append(self.source_slots[row][keep:])
            fresh = ids[keep:]
            news.append(fresh)
            positions.append(list(range(keep, keep + len(fresh))))
            self.source_ids[row] = ids
            self.source_slots[row] = self.source_slots[row][:keep]
        for row, fresh in enumerate(news):
            self.source_slots[row].extend(range(next_slot, next_slot + len(fresh)))  # left-aligned in the step's chunk
        return news, positions, retired

    def reorder(self, beam_idx: list[int]) -> None:
        self.target_ids = [list(self.target_ids[i]) for i in beam_idx]
        self.source_ids = [list(self.source_ids[i]) for i in beam_idx]
        self.source_slots = [list(self.source_slots[i]) for i in beam_idx]
