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
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedConfig, PreTrainedModel

from ..errors import LLMModulesError
from .connector import ConnectorCache, EnhancedCrossAttention
from .heads import HeadInputs, NewTokenHead, PointerMemory, SourceProjectionHead
from .loading import config_from_dict, load_target_body, tokenizer_of
from .masks import cross_attention_allowed
from .source import read_source
from .topology import ComposeParts, Topology, TopologyOutput


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


@dataclass
class BridgePass:
    """One bridge forward up to the head: the target's last states [B, T, d_t], the source states it read
    [B, T, d_s], the connector's attention maps (when asked) and the cache."""

    hidden: torch.Tensor
    source_states: torch.Tensor
    attention_maps: list[torch.Tensor] | None
    cache: BridgeCache | None


def bridge_forward(model, input_ids, attention_mask, position_ids, source_states, cache: BridgeCache | None,
                   use_cache: bool, output_attentions: bool) -> BridgePass:
    """One forward of a bridge model up to the head."""
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
    return BridgePass(output.last_hidden_state, source_states, attention_maps, cache)


class BridgeTopology(Topology):
    """The paper's graph: source tokens in and out, the target fed through ``inputs_embeds``."""

    name = "bridge"
    states_replace_ids = True  # the bridge reads nothing but the source's states
    new_module_prefixes = ("connector.",)  # the new head trains with the target's weights, as the paper's graph does

    def compose_parts(self, source: Any, target: Any, tokenizer: Any, source_tokenizer: Any,
                      source_config: PreTrainedConfig, target_init: str, options: dict[str, Any]) -> ComposeParts:
        ids = tokenizer_of(tokenizer, None, "source") or tokenizer_of(source_tokenizer, source, "source")
        if ids is None:
            raise LLMModulesError("without a source model, pass the source's tokenizer=...")
        vocab = max(int(source_config.get_text_config().vocab_size), len(ids))
        return ComposeParts(load_target_body(target, target_init), ids, None, vocab, True)

    def random_target(self, target_config: PreTrainedConfig) -> PreTrainedModel:
        return load_target_body(target_config, "random")

    def saved_target(self, config, target: Any, folder: Path) -> PreTrainedModel:
        # the bridge's target weights that train are all saved: its stored config rebuilds it
        return self.random_target(config_from_dict(config.target_config))

    def build(self, model: nn.Module, config, d_source: int, d_target: int, target: PreTrainedModel) -> None:
        model.connector = EnhancedCrossAttention(
            d_source, d_target, layers=config.connector_layers, heads=config.heads, adapter_dim=config.adapter_dim,
            intermediate_dim=config.intermediate_dim, gate=config.gate, attention_dropout=config.attention_dropout,
        )
        if config.head == "source":
            model.head = SourceProjectionHead(d_target, d_source)
            return
        new = NewTokenHead(d_target, config.vocab_size, model.source_vocab_size)
        model.head = self.mixture_head(new, config, d_target, d_source, fallback=new)

    def freeze(self, model: nn.Module) -> None:
        # The bridge feeds the target through inputs_embeds: its token embeddings are never read.
        embeddings = model.target.get_input_embeddings()
        if embeddings is not None:
            embeddings.requires_grad_(False)

    def input_embeddings(self, model: nn.Module) -> nn.Module | None:
        return None if model.source is None else model.source.get_input_embeddings()

    def output_embeddings(self, model: nn.Module) -> nn.Module | None:
        return model.head.output_embeddings

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.connector.layers

    def new_modules(self, model: nn.Module) -> nn.Module:
        return model.connector

    def source_states(self, model, input_ids, attention_mask, position_ids, cache, layers) -> torch.Tensor:
        return read_source(model.source, input_ids, attention_mask, position_ids, (model.config.source_layer,), cache)[0]

    def forward(self, model, input_ids, attention_mask, position_ids, cache, use_cache, logits_to_keep,
                output_attentions, inputs) -> TopologyOutput:
        run = bridge_forward(model, input_ids, attention_mask, position_ids, inputs.get("source_states"), cache,
                             use_cache, output_attentions)
        hidden = run.hidden[:, -logits_to_keep:] if logits_to_keep else run.hidden
        head = model.head(HeadInputs(
            hidden.to(model.connector.pre_proj.weight.dtype), run.hidden, None, run.source_states, attention_mask,
            run.cache, model.source_logits))
        return TopologyOutput(head.logits, head.head_logits, run.cache, run.attention_maps, head.source_weight,
                              head.call_gate_loss)

    def describe(self, config) -> str:
        return f"bridge; connector: {config.connector_layers} Enhanced Cross-Attention layers, {config.heads} heads,"
