"""How a fusion model reads the source: which source tokens a forward reads, running the source over them, and
the decoding state that keeps the source's view in step with the target's tokens (``FusionCache``).

With ``memory="prompt"`` the source reads the prompt once; decoding then costs the target plus cross-attention to
cached keys/values. With ``memory="sequence"`` it reads along, one step per new token (two tokenizers: through
``processing.SourceStream``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel

from ..errors import LLMModulesError
from .connector import ConnectorCache
from .deferral import DeferralState
from .heads import MIXTURE_HEADS, PointerMemory
from .masks import positions_from_padding
from .processing import MAIN, SourceStream, group_counts, source_self_mask
from .source import read_source


@dataclass(kw_only=True)
class FusionCache(PointerMemory):
    """Decoding state of a fusion model.

    target: the target's own KV cache. blocks: per-block source keys/values of every source slot.
    source: the source's KV cache (sequence memory). slot_valid [B, S]: slots read now (0 = padding or retired).
    stream: two tokenizers reading along. states: the source's last-layer state per slot (mixture heads).
    """

    target: DynamicCache
    blocks: ConnectorCache = field(default_factory=ConnectorCache)
    source: DynamicCache | None = None
    slot_valid: torch.Tensor | None = None
    slot_positions: torch.Tensor | None = None  # [B, S] position of each slot in the source's sequence
    stream: SourceStream | None = None
    states: torch.Tensor | None = None
    deferral: DeferralState | None = None  # deferral decoding (deferral.py): the source runs only where asked

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.target.get_seq_length()

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        for cache in (self.target, self.source):
            if cache is not None:
                cache.reorder_cache(beam_idx)
        self.blocks.reorder(beam_idx)
        self.reorder_pointer(beam_idx)
        for name in ("slot_valid", "slot_positions", "states"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.index_select(0, beam_idx.to(value.device)))
        if self.stream is not None:
            self.stream.reorder(beam_idx.tolist())
        if self.deferral is not None:
            self.deferral.reorder(beam_idx)


@dataclass
class SourceSide:
    """The source tokens of one forward: ids, mask, positions, tail groups, and n_i per target token."""

    input_ids: torch.LongTensor | None  # [B, S] (None when states come from the source-state cache)
    attention_mask: torch.Tensor  # [B, S]
    position_ids: torch.LongTensor  # [B, S]
    groups: torch.LongTensor  # [B, S]
    counts: torch.LongTensor  # [B, T]

    @property
    def has_tails(self) -> bool:
        return bool(((self.groups != MAIN) & self.attention_mask.bool()).any())


def source_side(model, input_ids, attention_mask, inputs: dict) -> SourceSide:
    """The source tokens a full (non-decoding) forward reads: given by the processor, or derived from the
    target's ids (so that one-tokenizer tools can drive the model)."""
    given = {k: inputs.get(k) for k in ("source_input_ids", "source_attention_mask", "source_position_ids",
                                        "source_groups", "source_counts")}
    if given["source_input_ids"] is None and given["source_counts"] is None:
        derived = model.processor.align_ids(input_ids, attention_mask)
        given = {k: derived[k] for k in given}
    ids, counts = given["source_input_ids"], given["source_counts"]
    if counts is None:
        raise LLMModulesError("source_input_ids came without source_counts; build the inputs with the model's processor "
                              "(model.processor(texts)) or pass the target's input_ids alone")
    reference = ids if ids is not None else inputs["source_states"]
    shape = reference.shape[:2]
    mask = given["source_attention_mask"]
    if mask is None:
        mask = torch.ones(shape, dtype=torch.long, device=reference.device)
    positions = given["source_position_ids"]
    if positions is None:
        positions = positions_from_padding(mask)
    groups = given["source_groups"]
    if groups is None:
        groups = torch.full(shape, MAIN, dtype=torch.long, device=reference.device)
    return SourceSide(ids, mask, positions, groups, counts)


def run_source(source: PreTrainedModel, side: SourceSide, cache: FusionCache | None, layers: tuple[int, ...]
               ) -> list[torch.Tensor]:
    """The source's states of every source token of a forward (main tokens and tails): per layer [B, S, d_s]."""
    self_mask = None
    if side.has_tails:
        self_mask = source_self_mask(side.attention_mask, side.groups, group_counts(side.groups, side.counts))
    return read_source(source, side.input_ids, side.attention_mask, side.position_ids, layers,
                       cache.source if cache is not None else None, self_mask)


def source_read_layers(model) -> tuple[int, ...]:
    """The source layers a fusion model reads: its blocks', plus the last one when a mixture head needs it."""
    layers = model.fusion.read_layers
    if model.config.head in MIXTURE_HEADS and -1 not in layers:
        layers = (*layers, -1)
    return layers


def source_view_rows(source: PreTrainedModel, batch: dict[str, torch.Tensor], layers: tuple[int, ...]
                     ) -> list[torch.Tensor]:
    """What the source-state cache stores for fusion: per row of a collated batch, [S_i, L, d_s]."""
    side = SourceSide(batch["source_input_ids"], batch["source_attention_mask"], batch["source_position_ids"],
                      batch["source_groups"], batch["source_counts"])
    states = torch.stack(run_source(source, side, None, layers), dim=2)  # [B, S, L, d_s]
    return [states[row, : int(n)] for row, n in enumerate(side.attention_mask.sum(-1))]


def decode_source_step(model, cache: FusionCache, input_ids: torch.LongTensor, layers: tuple[int, ...]
                        ) -> list[torch.Tensor] | None:
    """Sequence memory, one decoding step: the source reads the new text. Returns new slot states (or None)."""
    batch = input_ids.shape[0]
    device = input_ids.device
    if model.processor.shared:
        new_ids = input_ids
        new_valid = torch.ones_like(input_ids)
        new_positions = cache.slot_positions.max(-1, keepdim=True).values + 1 + torch.arange(
            input_ids.shape[1], device=device)
    else:
        start = cache.slot_valid.shape[1]
        news, positions, retired = cache.stream.step(input_ids.tolist(), start)
        for row, slots in enumerate(retired):
            if slots:
                cache.slot_valid[row, slots] = 0
        width = max(len(n) for n in news)
        if width == 0:
            return None
        pad = model.processor.source_tokenizer.pad_token_id or 0
        new_ids = torch.full((batch, width), pad, dtype=torch.long, device=device)
        new_valid = torch.zeros((batch, width), dtype=torch.long, device=device)
        new_positions = torch.zeros((batch, width), dtype=torch.long, device=device)
        for row, (ids, pos) in enumerate(zip(news, positions)):
            new_ids[row, : len(ids)] = torch.as_tensor(ids, device=device)
            new_valid[row, : len(ids)] = 1
            new_positions[row, : len(pos)] = torch.as_tensor(pos, device=device)
    cache.slot_valid = torch.cat([cache.slot_valid, new_valid], 1)
    cache.slot_positions = torch.cat([cache.slot_positions, new_positions], 1)
    return read_source(model.source, new_ids, cache.slot_valid, new_positions, layers, cache.source)


def start_decoding(model, cache: FusionCache, side: SourceSide, input_ids, attention_mask) -> None:
    """After the prompt: the slots read from now on are the last prompt token's view (its main tokens and tail)."""
    valid = side.attention_mask.bool()
    main = (side.groups == MAIN) & valid
    rank = main.long().cumsum(-1) - 1
    last = side.counts[:, -1:]  # [B, 1] main tokens the last prompt token reads
    if model.config.memory == "prompt":
        now = valid
    else:
        now = (main & (rank < last)) | ((side.groups == input_ids.shape[1] - 1) & valid)
    cache.slot_valid = now.long()
    cache.slot_positions = side.position_ids.masked_fill(~now, -1)
    if model.config.memory == "sequence" and not model.processor.shared:
        ids = side.input_ids.tolist()
        slots = [[j for j in range(now.shape[1]) if now[b, j]] for b in range(now.shape[0])]
        valid_ids = [[ids[b][j] for j in row] for b, row in enumerate(slots)]
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        target_ids = [[t for t, m in zip(r, mr) if m] for r, mr in zip(input_ids.tolist(), mask.tolist())]
        cache.stream = SourceStream(model.processor, target_ids, valid_ids, slots)
