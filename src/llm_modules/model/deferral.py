"""Deferral decoding: ask the source only where the small model is unsure.

After Co-LLM (Shen et al., ACL 2024: a gate on the small model's last state decides, token by token, whether the
assistant generates; a threshold at decode time sets how often) and Big Little Decoder (Kim et al., NeurIPS 2023:
the large model catches up on the pending tokens in one non-autoregressive pass).

A fusion model with a mixture head (``source_mix``/``source_pointer``), no cross-attention blocks
(``fusion_layers: []``) and a gate that reads only the target can decide before the source runs: the mixture gate
itself (``mixture_gate: state | target_confidence``), or a call gate beside any mixture gate (``call_gate: true``,
model/heads.py: trained where the mixture's token differs from the target's own). At each decoding step:

1. the target runs alone and gives its last state and its own distribution;
2. the deciding gate gives a score s (``SourceMixture.call_score``: the weight the mixture would give the source, or
   the call gate's probability); where s < η (``defer_threshold``) the token's distribution is the target's own and
   the source does not run;
3. where s >= η the source catches up on every token since its last call in one chunked forward through its KV
   cache (so its cache is exactly what running it at every step would have built), and its distribution is mixed
   in as the every-token mixture does. η = 0 is the every-token mixture.

Rows of a batch decide independently; the source's cache is one tensor per layer, so when any row calls it every
row's pending tokens are read in that one forward (the rows that did not ask keep the target's distribution).
``DeferralState`` counts, per row, the positions whose gate called the source, and the source's forwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from ..errors import LLMModulesError
from .heads import HeadInputs
from .masks import positions_from_padding
from .source import read_source


@dataclass
class DeferralState:
    """What deferral decoding keeps between steps (part of ``FusionCache``).

    source_length: tokens the source's cache covers; pending_ids [B, P]: tokens it has not read yet;
    pending_hidden [B, P, d_t]: the target's states there (the pointer's keys need them);
    positions [B] decoded positions; source_positions [B] positions whose gate called the source;
    source_calls: forwards of the source.
    """

    source: DynamicCache
    source_length: int = 0
    pending_ids: torch.Tensor | None = None
    pending_hidden: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    source_positions: torch.Tensor | None = None
    source_calls: int = 0

    def report(self) -> list[dict[str, float]]:
        """Per row: decoded positions, the fraction where the source ran, the source's forwards (shared by the batch)."""
        if self.positions is None:
            return []
        return [{"positions": int(n), "source_position_fraction": float(s) / max(int(n), 1),
                 "source_calls": self.source_calls}
                for n, s in zip(self.positions.tolist(), self.source_positions.tolist())]

    def reorder(self, beam_idx: torch.Tensor) -> None:
        self.source.reorder_cache(beam_idx)
        for name in ("pending_ids", "pending_hidden", "positions", "source_positions"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.index_select(0, beam_idx.to(value.device)))


def catch_up(model, state: DeferralState, attention_mask: torch.Tensor) -> torch.Tensor:
    """The source reads every pending token in one forward through its cache: [B, P] ids -> last-layer states
    [B, P, d_s]. attention_mask [B, >= source_length + P] (the target's: one tokenizer, the same ids)."""
    ids = state.pending_ids
    end = state.source_length + ids.shape[1]
    mask = attention_mask[:, :end]
    positions = positions_from_padding(mask)[:, state.source_length:end]
    (states,) = read_source(model.source, ids, mask, positions, (-1,), state.source)
    state.source_length = end
    state.source_calls += 1
    return states


def deferred_forward(model, input_ids: torch.LongTensor, attention_mask: torch.Tensor, position_ids: torch.LongTensor,
                     cache, logits_to_keep: int) -> torch.Tensor:
    """One cached decoding forward with deferral: log-probabilities [B, t, V] (the mixture's where the gate called
    the source, the target's own elsewhere)."""
    if model.source is None:
        raise LLMModulesError("deferral decoding calls the source where the gate asks; load the model with its source")
    state = cache.deferral
    output = model.target(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          cache=cache.target, use_cache=True, logits_to_keep=logits_to_keep, output_hidden_states=True)
    full_hidden = output.hidden_states[-1]  # [B, T, d_t]
    t = output.logits.shape[1]
    hidden = full_hidden[:, -t:]
    base = output.logits.float().log_softmax(-1)  # [B, t, V]
    mixture = model.head.mixture
    threshold = float(model.config.defer_threshold)
    calls = mixture.call_score(hidden, base) >= threshold  # [B, t]
    if state.positions is None:
        state.positions = torch.zeros(input_ids.shape[0], dtype=torch.long)
        state.source_positions = torch.zeros(input_ids.shape[0], dtype=torch.long)
    state.positions += t
    state.source_positions += calls.sum(-1).cpu()
    state.pending_ids = input_ids if state.pending_ids is None else torch.cat([state.pending_ids, input_ids], 1)
    if mixture.pointer:
        state.pending_hidden = full_hidden if state.pending_hidden is None else torch.cat([state.pending_hidden,
                                                                                          full_hidden], 1)
    if not bool(calls.any()):
        return base
    states = catch_up(model, state, attention_mask)  # [B, P, d_s]
    pointer_hidden = state.pending_hidden
    state.pending_ids = state.pending_hidden = None
    return model.head(HeadInputs(hidden, pointer_hidden, base, states, attention_mask, cache, model.source_logits,
                                 threshold)).logits
