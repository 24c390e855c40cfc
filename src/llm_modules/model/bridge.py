"""Bridge topology: the paper's released architecture (Kolomeitsev 2025, arXiv:2502.08213).

    input_ids [B, T] (source tokens)
      -> frozen source (eval, no_grad) -> hidden_states[source_layer]   [B, T, d_s]
      -> connector stack (masks.cross_attention_allowed: causal unless leaky) -> [B, T, d_t]
      -> target body via inputs_embeds                                  [B, T, d_t]
      -> a head over the source vocabulary (heads.py)                   [B, T, V_src]

The target's own tokenizer, embeddings and head are not used: the bridge reads and writes source tokens.
Decoding keeps three caches (``BridgeCache``): the source's KV cache, the connector's per-layer projected
source keys/values, the target's KV cache. Each new token costs one step of each.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from .connector import ConnectorCache
from .heads import PointerMemory
from .masks import cross_attention_allowed


@dataclass(kw_only=True)
class BridgeCache(PointerMemory):
    """Decoding state of the bridge: one cache per stage (+ the pointer head's past keys and states)."""

    source: DynamicCache | None
    connector: ConnectorCache
    target: DynamicCache

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.connector.length()

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        for cache in (self.source, self.target):
            if cache is not None:
                cache.reorder_cache(beam_idx)
        self.connector.reorder(beam_idx)
        self.reorder_pointer(beam_idx)


def bridge_forward(model, input_ids, attention_mask, position_ids, source_states, cache: BridgeCache | None,
                   use_cache: bool, output_attentions: bool):
    """One forward of a bridge model up to the head. Returns (target last hidden [B, T, d_t],
    source states [B, T, d_s], attention maps, cache)."""
    reference = input_ids if input_ids is not None else source_states
    batch, length = reference.shape[:2]
    past = cache.get_seq_length() if cache is not None else 0
    if use_cache and cache is None:
        cache = BridgeCache(
            source=DynamicCache(config=model.source.config) if model.source is not None else None,
            connector=ConnectorCache(),
            target=DynamicCache(config=model.target.config),
        )
    if source_states is None:
        source_states = model.source_states(input_ids, attention_mask, position_ids,
                                            cache.source if cache is not None else None)
    connector = model.connector
    absolute = torch.arange(past + length, device=attention_mask.device).expand(batch, -1)
    allowed = cross_attention_allowed(absolute[:, past:], absolute, key_valid=attention_mask, leaky=model.config.leaky)
    embeds, attention_maps = connector(
        source_states.to(connector.pre_proj.weight.dtype),
        allowed,
        cache.connector if cache is not None else None,
        return_attention=output_attentions,
    )
    output = model.target(
        inputs_embeds=embeds.to(model.target.dtype),
        attention_mask=attention_mask,
        position_ids=position_ids,
        cache=cache.target if cache is not None else None,
        use_cache=use_cache,
    )
    return output.last_hidden_state, source_states, attention_maps, cache
