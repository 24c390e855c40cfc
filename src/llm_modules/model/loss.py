"""The composed model's training loss: next-token cross-entropy, plus the mixture head's base term.

One definition, read by ``forward(labels=...)``, by ``Trainer`` (``training/trainer.py``: ``token_mean_loss``) and by
the fact-world loop (``evaluation/factworld/lm.py``), so that the three can never disagree on the shift, the ignored
label or the mixture term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy in fp32: logits [B, T, V] predict labels [B, T] shifted by one; -100 ignored.

    ``reduction="sum"`` sums over the trained tokens (``Trainer`` divides by its count over a whole accumulated batch).
    """
    shifted = logits[:, :-1].float()
    targets = labels[:, 1:].to(shifted.device)
    return F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction=reduction)


def composed_lm_loss(logits: torch.Tensor, head_logits: torch.Tensor | None, labels: torch.Tensor,
                     num_items: torch.Tensor | int | None = None) -> torch.Tensor:
    """The training loss of a composed model: the output's next-token loss, plus, for a mixture head
    (``source_mix``/``source_pointer``) in training, its base head's own loss, so that the base head learns every
    token whatever the gate does (the gate alone cannot teach it the tokens it hands to the source).

    logits, head_logits [B, T, V] (head_logits None without a mixture head), labels [B, T]. ``num_items``: divide the
    summed loss by this count (``Trainer``'s tokens per accumulated step); None: the mean over trained tokens.
    """
    total = causal_lm_loss(logits, labels, "sum")
    if head_logits is not None:
        total = total + causal_lm_loss(head_logits, labels, "sum")
    if num_items is None:
        return total / (labels[:, 1:] != IGNORE_INDEX).sum().clamp(min=1)
    return total / torch.as_tensor(num_items, device=total.device)
