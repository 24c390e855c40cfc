"""Fusion's gated cross-attention blocks and where they sit in the target (``fusion.py`` runs them).

Each block is the shared ``EnhancedCrossAttentionLayer`` (queries from the target's stream, keys and values
projected from the source's width, an adapter, a tanh gate at 0). A forward pre-hook on each chosen decoder layer
adds its block's gated update to the hidden states entering that layer, so the target's own modules stay untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from ..errors import LLMModulesError
from .connector import EnhancedCrossAttentionLayer


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
