"""Which source states a target position may read: the causal cross-attention rule.

A target token i may read source token j only if source token j *ends* (in characters of the
shared text) at or before target token i ends. With one tokenizer for both sides this is the
familiar ``j <= i``. The released LLM Modules code masks padding only ("leaky"): every position
can read states of the tokens it is trained to predict. We keep that behaviour only as a switch.
"""

from __future__ import annotations

import torch


def token_end_offsets(offset_mapping: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Character offset at which each token ends.

    offset_mapping: [B, T, 2] (start, end) from a fast tokenizer's ``return_offsets_mapping``.
    Returns [B, T] long; padding positions get a huge value so no query can read them.
    """
    ends = offset_mapping[..., 1].long()
    if attention_mask is not None:
        ends = ends.masked_fill(attention_mask == 0, torch.iinfo(torch.long).max)
    return ends


def cross_attention_allowed(
    query_ends: torch.Tensor,
    key_ends: torch.Tensor,
    key_valid: torch.Tensor | None = None,
    leaky: bool = False,
) -> torch.Tensor:
    """Boolean [B, Tq, Tk] matrix: may query i read key j?

    query_ends: [B, Tq] end offsets (or absolute positions) of target tokens.
    key_ends:   [B, Tk] end offsets (or absolute positions) of source tokens.
    key_valid:  [B, Tk] 1 for real tokens, 0 for padding.
    leaky: reproduce the released padding-only mask (every query reads every real key).

    """
    batch, q_len = query_ends.shape
    k_len = key_ends.shape[1]
    if leaky:
        allowed = torch.ones(batch, q_len, k_len, dtype=torch.bool, device=query_ends.device)
    else:
        allowed = key_ends[:, None, :] <= query_ends[:, :, None]
    if key_valid is not None:
        allowed = allowed & key_valid.bool()[:, None, :]
    # A row that may read nothing (a padding query) reads everything instead, only to keep the
    # softmax finite; padding outputs are never read by a real position.
    empty = ~allowed.any(dim=-1, keepdim=True)  # [B, Tq, 1]
    return allowed | empty


def positions_from_padding(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding: [B, T] long, 0 at each row's first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
