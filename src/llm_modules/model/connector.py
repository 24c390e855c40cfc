"""Enhanced Cross-Attention: the trainable bridge between a source width and a target width.

Graph (Kolomeitsev 2025, arXiv 2502.08213, as in its released ``model.py``),
with H the source states [B, T, d_s]:

    P = pre_proj(H)                         d_s -> d_s
    R = proj(P)                             d_s -> d_t          (skip path)
    G = LN(Lin(GELU(LN(Lin(P)))))           d_s -> mid -> d_t   ("intermediate layers")
    for each layer:
        A  = MHA(q = LN(G), k = v = LN(P))  queries in d_t, keys/values projected from d_s
        A' = A + LN(fc2(GELU(fc1(A))))      adapter (bottleneck, non-linearity, norm, residual)
        sigmoid gate (paper): g = σ(W[G; A'] + b);  G <- G + g⊙A' + (1-g)⊙G   (released double residual)
        tanh gate (Flamingo):  G <- G + tanh(α)⊙A',  α = 0 at init (the layer starts as identity)
    Z = G + R                               -> the target's ``inputs_embeds``

The attention mask is given by the caller (``masks.cross_attention_allowed``): causal by default.
Keys/values of each layer depend only on P, so decoding caches them per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

GATES = ("sigmoid", "tanh")


@dataclass
class ConnectorCache:
    """Per-layer projected keys/values of every source position seen so far.

    keys[l], values[l]: [B, heads, S, head_dim].
    """

    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)

    def length(self) -> int:
        return 0 if not self.keys else self.keys[0].shape[2]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer == len(self.keys):
            self.keys.append(k)
            self.values.append(v)
        else:
            self.keys[layer] = torch.cat([self.keys[layer], k], dim=2)
            self.values[layer] = torch.cat([self.values[layer], v], dim=2)
        return self.keys[layer], self.values[layer]

    def reorder(self, beam_idx: torch.Tensor) -> None:
        self.keys = [k.index_select(0, beam_idx.to(k.device)) for k in self.keys]
        self.values = [v.index_select(0, beam_idx.to(v.device)) for v in self.values]


class Adapter(nn.Module):
    """Bottleneck adapter with a post-norm residual: x + LN(fc2(GELU(fc1(x))))."""

    def __init__(self, width: int, bottleneck: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, bottleneck)
        self.fc2 = nn.Linear(bottleneck, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, width] -> [B, T, width]
        return x + self.norm(self.fc2(F.gelu(self.fc1(x))))


class EnhancedCrossAttentionLayer(nn.Module):
    """One cross-attention + adapter + gate block; queries in target width, keys/values from source width."""

    def __init__(
        self, d_source: int, d_target: int, heads: int, adapter_dim: int, gate: str, attention_dropout: float
    ) -> None:
        super().__init__()
        if gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
        if d_target % heads:
            raise ValueError(
                f"the target width {d_target} is not divisible by heads={heads}; choose heads that divide it"
            )
        self.heads, self.head_dim, self.gate_kind = heads, d_target // heads, gate
        self.query_norm = nn.LayerNorm(d_target)
        self.source_norm = nn.LayerNorm(d_source)
        self.q = nn.Linear(d_target, d_target)
        self.k = nn.Linear(d_source, d_target)
        self.v = nn.Linear(d_source, d_target)
        self.o = nn.Linear(d_target, d_target)
        self.attention_dropout = attention_dropout
        self.adapter = Adapter(d_target, adapter_dim)
        if gate == "sigmoid":
            self.gate = nn.Linear(2 * d_target, d_target)
        else:
            self.gate_alpha = nn.Parameter(torch.zeros(d_target))
        # Mean gate opening of the last forward, for plots; kept as a tensor so decoding never syncs.
        self.last_gate: torch.Tensor | None = None

    def _split(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, d_t] -> [B, heads, T, head_dim]
        b, t, _ = x.shape
        return x.view(b, t, self.heads, self.head_dim).transpose(1, 2)

    def project_source(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of source positions: [B, S, d_s] -> 2 x [B, heads, S, head_dim]."""
        normed = self.source_norm(source)
        return self._split(self.k(normed)), self._split(self.v(normed))

    def forward(
        self,
        hidden: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        allowed: torch.Tensor,
        return_attention: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden: [B, Tq, d_t]; keys/values: [B, heads, S, head_dim]; allowed: [B, Tq, S] bool."""
        b, t, d = hidden.shape
        q = self._split(self.q(self.query_norm(hidden)))
        mask = allowed[:, None, :, :]
        dropout = self.attention_dropout if self.training else 0.0
        probs = None
        if return_attention:
            scores = (q @ keys.transpose(-1, -2)) / self.head_dim**0.5
            probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
            attended = F.dropout(probs, dropout, self.training) @ values
        else:
            attended = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, dropout_p=dropout)
        attended = self.o(attended.transpose(1, 2).reshape(b, t, d))
        adapted = self.adapter(attended)
        if self.gate_kind == "sigmoid":
            g = torch.sigmoid(self.gate(torch.cat([hidden, adapted], dim=-1)))
            self.last_gate = g.detach().float().mean()
            # The release adds the gated blend on top of a residual: G + g*A' + (1-g)*G.
            out = hidden + g * adapted + (1 - g) * hidden
        else:
            g = torch.tanh(self.gate_alpha)
            self.last_gate = g.detach().float().abs().mean()
            out = hidden + g * adapted
        return out, probs


class EnhancedCrossAttention(nn.Module):
    """The connector stack: projections between widths, intermediate MLP, N gated cross-attention layers."""

    def __init__(
        self,
        d_source: int,
        d_target: int,
        layers: int = 2,
        heads: int = 8,
        adapter_dim: int = 256,
        intermediate_dim: int | None = None,
        gate: str = "sigmoid",
        attention_dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if layers < 0:
            raise ValueError(f"connector_layers must be >= 0, got {layers}")
        mid = intermediate_dim or (d_source + d_target) // 2
        self.pre_proj = nn.Linear(d_source, d_source)
        self.proj = nn.Linear(d_source, d_target)
        self.intermediate = nn.Sequential(
            nn.Linear(d_source, mid), nn.LayerNorm(mid), nn.GELU(), nn.Linear(mid, d_target), nn.LayerNorm(d_target)
        )
        self.layers = nn.ModuleList(
            EnhancedCrossAttentionLayer(d_source, d_target, heads, adapter_dim, gate, attention_dropout)
            for _ in range(layers)
        )

    def forward(
        self,
        source: torch.Tensor,
        allowed: torch.Tensor,
        cache: ConnectorCache | None = None,
        return_attention: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Map new source states to target input embeddings.

        source:  [B, Tq, d_s] states of the new positions (all positions when not decoding).
        allowed: [B, Tq, S] which of the S = cached + new source positions each new position may read.
        cache:   per-layer keys/values of earlier positions; extended in place.
        Returns ([B, Tq, d_t], attention probabilities per layer if asked).
        """
        projected = self.pre_proj(source)
        hidden = self.intermediate(projected)
        maps: list[torch.Tensor] = []
        for index, layer in enumerate(self.layers):
            k, v = layer.project_source(projected)
            if cache is not None:
                k, v = cache.append(index, k, v)
            hidden, probs = layer(hidden, k, v, allowed, return_attention)
            if probs is not None:
                maps.append(probs)
        return hidden + self.proj(projected), maps

    def gate_values(self) -> list[float]:
        """Mean gate opening per layer at the last forward pass."""
        return [float("nan") if layer.last_gate is None else float(layer.last_gate) for layer in self.layers]
