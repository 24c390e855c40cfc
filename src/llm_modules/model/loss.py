"""The composed model's training loss: next-token cross-entropy, plus the mixture head's base term.

One definition, read by ``forward(labels=...)``, by ``Trainer`` (``training/trainer.py``: ``token_mean_loss``), by
the fact-world loop (``evaluation/factworld/``), by SemAlign (its attribution and output term) and by evaluation's
answer NLL, so that none of them can disagree on the shift, the ignored label or the mixture term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def next_token_mask(labels: torch.Tensor) -> torch.Tensor:
    """Which predictions are trained: labels [B, T] -> bool [B, T-1], True at position t when label t+1 is not -100
    (logits[:, :-1][mask] are the trained predictions, labels[:, 1:][mask] their targets)."""
    return labels[:, 1:] != IGNORE_INDEX


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy in fp32: logits [B, T, V] predict labels [B, T] shifted by one; -100 ignored.

    ``reduction="sum"`` sums over the trained tokens (``Trainer`` divides by its count over a whole accumulated batch);
    ``"none"``: one value per prediction, [B*(T-1)] (0 where ignored).
    """
    shifted = logits[:, :-1].float()
    targets = labels[:, 1:].to(shifted.device)
    return F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction=reduction)


def composed_lm_loss(logits: torch.Tensor, head_logits: torch.Tensor | None, labels: torch.Tensor,
                     num_items: torch.Tensor | int | None = None,
                     call_cost: torch.Tensor | None = None) -> torch.Tensor:
    """The training loss of a composed model: the output's next-token loss, plus, for a mixture head
    (``source_mix``/``source_pointer``) in training, its base head's own loss, so that the base head learns every
    token whatever the gate does (the gate alone cannot teach it the tokens it hands to the source), and the price
    of its calls to the source at each trained prediction (``call_cost``: ``source_call_price`` nats times the
    gate's source weight, plus a call gate's cross-entropy where there is one).

    logits, head_logits [B, T, V] (head_logits None without a mixture head), labels [B, T], call_cost [B, T] or None
    (no price). ``num_items``: divide the summed loss by this count (``Trainer``'s tokens per accumulated step);
    None: the mean over trained tokens. Each term is divided on its own: without ``num_items`` each is then bit for
    bit ``causal_lm_loss``'s mean.

    Why a price: the mixture's cross-entropy alone opens the gate wherever the source gives the gold token even a
    little more probability, so a deferring model would call the source at most positions; with a price the gate
    opens where the source's gain is worth the price (Co-LLM's gate has no such term; it sets the call rate
    with the decode-time threshold alone).
    """
    if num_items is None:
        count = next_token_mask(labels).sum().clamp(min=1)
    else:
        count = torch.as_tensor(num_items, device=logits.device)
    loss = causal_lm_loss(logits, labels, "sum") / count
    if head_logits is not None:
        loss = loss + causal_lm_loss(head_logits, labels, "sum") / count
    if call_cost is not None:
        loss = loss + call_cost[:, :-1].float()[next_token_mask(labels)].sum() / count
    return loss
