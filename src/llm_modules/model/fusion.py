"""Fusion topology: the target keeps its tokenizer, embeddings and head, and reads the source through gated
cross-attention blocks inserted before some of its decoder layers (Flamingo, Alayrac et al. 2022; CALM,
Bansal et al. 2024, arXiv:2401.02412).

How fusion reads the source, in order (``fusion_forward``):

1. **What the source reads** (``processing.py``): the same text through its own tokenizer. With
   ``memory="prompt"`` it reads the prompt once; decoding then costs the target plus cross-attention to
   cached keys/values. With ``memory="sequence"`` it reads along, one step per new token.
2. **The source runs** frozen and in eval mode; the layers it is read at are ``source_layers``
   (hidden_states indices; one for all blocks, or one per block as CALM maps layers to layers).
3. **Each block** (the shared ``EnhancedCrossAttentionLayer``: queries from the target's stream, keys and
   values projected from the source's width, an adapter, a tanh gate at 0) projects its source layer to
   keys/values once per source token; decoding appends them to ``FusionCache.blocks``.
4. **The causal law**: target token i reads only the source's view of the text up to where token i ends
   (``processing.cross_attention_from_counts``); a token that may read nothing gets no update at all.
5. **The target runs** as itself: a forward pre-hook on each chosen decoder layer adds its block's gated
   update to the hidden states entering that layer (the target's modules are untouched, so its own
   masks, caches, position handling and any PEFT adapters keep working). With every gate at 0 the
   composed model computes exactly the target alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel

from ..errors import LLMModulesError
from .connector import ConnectorCache, EnhancedCrossAttentionLayer
from .heads import PointerMemory
from .processing import MAIN, CompositionProcessor, SourceStream, cross_attention_from_counts, group_counts, source_self_mask
from .source import read_source


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The target's stack of decoder blocks, whatever its family calls it (``model.layers``, ``transformer.h``...)."""
    count = int(model.config.get_text_config().num_hidden_layers)
    for _, module in model.base_model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise LLMModulesError(
        f"could not find the {count} decoder layers of the target {type(model).__name__}; fusion needs a "
        "transformers causal LM whose base model keeps its blocks in an nn.ModuleList"
    )


def default_fusion_layers(num_layers: int, every: int) -> list[int]:
    """Blocks before target layers 0, k, 2k, ... (CALM and Flamingo-9B use k = 4)."""
    if every < 1:
        raise LLMModulesError(f"fusion_every must be >= 1, got {every}")
    return list(range(0, num_layers, every))


@dataclass
class FusionContext:
    """What the blocks read during one target forward: keys/values per block [B, h, S, hd], who reads what."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    allowed: torch.Tensor  # [B, T, S] bool, rows that read nothing are opened (see reads_any)
    reads_any: torch.Tensor  # [B, T, 1] bool


class _PreLayerHook:
    """Forward pre-hook on a target decoder layer: hidden <- hidden + gated cross-attention update."""

    def __init__(self, fusion: "Fusion", block: int) -> None:
        self.fusion, self.block = fusion, block

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict):
        context = self.fusion.context
        if context is None:
            return None
        in_kwargs = "hidden_states" in kwargs
        hidden = kwargs["hidden_states"] if in_kwargs else args[0]
        layer = self.fusion.blocks[self.block]
        dtype = layer.q.weight.dtype
        updated, _ = layer(hidden.to(dtype), context.keys[self.block], context.values[self.block], context.allowed)
        hidden = torch.where(context.reads_any, updated, hidden.to(dtype)).to(hidden.dtype)
        if in_kwargs:
            return args, {**kwargs, "hidden_states": hidden}
        return (hidden, *args[1:]), kwargs


class Fusion(nn.Module):
    """The gated cross-attention blocks of the fusion topology and where they sit."""

    def __init__(self, d_source: int, d_target: int, target_layers: list[int], source_layers: list[int], heads: int,
                 adapter_dim: int, gate: str, attention_dropout: float) -> None:
        super().__init__()
        if len(source_layers) not in (1, len(target_layers)):
            raise LLMModulesError(f"source_layers must name one layer or one per fusion block ({len(target_layers)}), "
                                  f"got {source_layers}")
        self.target_layers = list(target_layers)
        self.block_source_layers = list(source_layers) * (len(target_layers) if len(source_layers) == 1 else 1)
        self.read_layers = tuple(dict.fromkeys(self.block_source_layers))  # unique, in first-use order
        self.blocks = nn.ModuleList(
            EnhancedCrossAttentionLayer(d_source, d_target, heads, adapter_dim, gate, attention_dropout)
            for _ in target_layers
        )
        self.context: FusionContext | None = None
        self._handles: list = []

    def attach(self, target: PreTrainedModel) -> None:
        """Hook each block in front of its target layer (idempotent)."""
        for handle in self._handles:
            handle.remove()
        layers = decoder_layers(target)
        bad = [i for i in self.target_layers if not -len(layers) <= i < len(layers)]
        if bad:
            raise LLMModulesError(f"fusion_layers {bad} do not exist: the target has {len(layers)} decoder layers")
        self._handles = [layers[i].register_forward_pre_hook(_PreLayerHook(self, b), with_kwargs=True)
                         for b, i in enumerate(self.target_layers)]

    def project(self, states: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Source states per read layer [B, S, d_s] -> keys, values per block, each [B, heads, S, head_dim]."""
        by_layer = dict(zip(self.read_layers, states))
        keys, values = [], []
        for block, layer in zip(self.blocks, self.block_source_layers):
            k, v = block.project_source(by_layer[layer].to(block.k.weight.dtype))
            keys.append(k)
            values.append(v)
        return keys, values

    def gate_values(self) -> list[float]:
        return [float("nan") if b.last_gate is None else float(b.last_gate) for b in self.blocks]


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
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
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


def source_view_rows(source: PreTrainedModel, batch: dict[str, torch.Tensor], layers: tuple[int, ...]
                     ) -> list[torch.Tensor]:
    """What the source-state cache stores for fusion: per row of a collated batch, [S_i, L, d_s]."""
    side = SourceSide(batch["source_input_ids"], batch["source_attention_mask"], batch["source_position_ids"],
                      batch["source_groups"], batch["source_counts"])
    states = torch.stack(run_source(source, side, None, layers), dim=2)  # [B, S, L, d_s]
    return [states[row, : int(n)] for row, n in enumerate(side.attention_mask.sum(-1))]


def _decode_source_step(model, cache: FusionCache, input_ids: torch.LongTensor, layers: tuple[int, ...]
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


def fusion_forward(model, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None, position_ids,
                   cache: FusionCache | None, use_cache: bool, logits_to_keep: int, inputs: dict):
    """One forward of a fusion model. Returns (target logits [B, t, V], target last hidden [B, T, d_t] or None,
    source last-layer states aligned with the target [B, T, d_s] or None, cache).

    ``inputs``: the source_* tensors (and ``source_states`` [B, S, L, d_s] from the source-state cache).
    """
    fusion: Fusion = model.fusion
    batch, length = input_ids.shape
    past = cache.get_seq_length() if cache is not None else 0
    wants_states = model.config.head in ("source_mix", "source_pointer")
    layers = fusion.read_layers + ((-1,) if wants_states and -1 not in fusion.read_layers else ())
    if use_cache and cache is None:
        cache = FusionCache(target=DynamicCache(config=model.target.config),
                            source=DynamicCache(config=model.source.config)
                            if model.config.memory == "sequence" and model.source is not None else None)
    if past == 0:
        side = source_side(model, input_ids, attention_mask, inputs)
        if inputs.get("source_states") is not None:
            cached = inputs["source_states"]  # [B, S, L, d_s], L = read layers (+ last)
            states = [cached[:, :, i] for i in range(cached.shape[2])]
        else:
            states = run_source(model.source, side, cache, layers)
        columns = torch.arange(length, device=input_ids.device)
        allowed = cross_attention_from_counts(side.attention_mask, side.groups, side.counts, columns, model.config.leaky)
        if cache is not None:
            _start_decoding(model, cache, side, input_ids, attention_mask)
    else:
        if length != 1 and model.config.memory == "sequence":
            raise LLMModulesError("a fusion model with memory='sequence' decodes one token per step after the prompt")
        states = _decode_source_step(model, cache, input_ids, layers) if model.config.memory == "sequence" else None
        allowed = cache.slot_valid.bool()[:, None, :].expand(-1, length, -1)
    keys, values = fusion.project(states[: len(fusion.read_layers)]) if states is not None else ([], [])
    if cache is not None:
        if states is not None:
            pairs = [cache.blocks.append(b, k, v) for b, (k, v) in enumerate(zip(keys, values))]
            keys, values = [k for k, _ in pairs], [v for _, v in pairs]
        else:
            keys, values = cache.blocks.keys, cache.blocks.values
    last_states = states[layers.index(-1)] if wants_states and states is not None else None
    if cache is not None and wants_states:
        cache.states = last_states if cache.states is None else torch.cat([cache.states, last_states], 1)
    reads_any = allowed.any(-1, keepdim=True)
    fusion.context = FusionContext(keys, values, allowed | ~reads_any, reads_any)
    try:
        output = model.target(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache.target if cache is not None else None,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            output_hidden_states=wants_states,
        )
    finally:
        # Activation checkpointing re-runs the hooks during backward, so it keeps the context until the next
        # forward; otherwise it goes now, and the target called on its own is the target alone again.
        if not (getattr(model.target, "is_activation_checkpointing", False) and torch.is_grad_enabled()):
            fusion.context = None
    hidden = output.hidden_states[-1] if wants_states else None  # all new positions (pointer keys need them)
    return output.logits, hidden, last_states, cache


def _start_decoding(model, cache: FusionCache, side: SourceSide, input_ids, attention_mask) -> None:
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
