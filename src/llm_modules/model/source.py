"""Running the frozen source: hidden states of chosen layers, with or without a KV cache."""

from __future__ import annotations

import torch
from transformers import DynamicCache, PreTrainedModel

from ..errors import LLMModulesError


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool [B, Q, K] (True = may read) -> float [B, 1, Q, K], 0 where allowed and the dtype's minimum elsewhere:
    the custom 4D mask transformers models take as is (eager adds it, SDPA accepts it)."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


@torch.no_grad()
def read_source(
    source: PreTrainedModel,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor,
    position_ids: torch.LongTensor,
    layers: tuple[int, ...] = (-1,),
    cache: DynamicCache | None = None,
    self_mask: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """Hidden states of ``layers`` (``hidden_states`` indices; -1 is the final, normed output): each [B, S, d_s].

    input_ids, position_ids: [B, S] new tokens; attention_mask: [B, past + S] (0 for padding or retired slots);
    self_mask: optional bool [B, S, S] of which new token reads which (tails, see processing.py), used instead
    of the causal + padding mask when there is no past.
    """
    mask = attention_mask if self_mask is None else additive_mask(self_mask, source.dtype)
    wants_hidden = any(layer != -1 for layer in layers)
    output = source.base_model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=position_ids,
        cache=cache,
        use_cache=cache is not None,
        output_hidden_states=wants_hidden,
    )
    hidden = getattr(output, "hidden_states", None)
    states = []
    for layer in layers:
        state = getattr(output, "last_hidden_state", None) if layer == -1 else (None if hidden is None else hidden[layer])
        if state is None:
            raise LLMModulesError(
                f"the source {type(source).__name__} returned no hidden state for layer {layer}; it must be a "
                "transformers causal LM whose base model returns last_hidden_state and supports output_hidden_states"
            )
        states.append(state)
    return states
