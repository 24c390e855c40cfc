"""SemAlign's training objective: a layer loss per pair plus an output loss, and the frontier schedule.

v1 (arXiv:2510.24208v1 §3): ``L = L_layer + L_out``, unweighted.
  - L_layer = 1 - mean_t cos(Δ_tgt^(k)_t, M·h̃_src,t/‖h̃_src,t‖) over the real tokens, per pair (cosine).
  - L_out = 1 - mean cos(z, onehot(y)) = 1 - z_y/‖z‖ over the answer tokens (a cosine surrogate for CE).
v2 (abstract of arXiv:2510.24208v2 / ACL Findings 2026):
  - L_layer = 1 - CKA(Δ_tgt^(k), M·h̃_src) per sequence: the centred token-token Gram matrices of the
    two (linear CKA, ``‖X̄ᵀȲ‖²_F / (‖X̄ᵀX̄‖_F ‖ȲᵀȲ‖_F)``), so only the relation geometry must match.
  - L_out = KL(p_src ‖ q_tgt) over the answer tokens (the source's own next-token distribution).
  - Frontier: the steps are split into one phase per pair, shallow to deep; in phase i only the
    target layer of pair i trains and only its layer loss counts (:class:`Frontier`).
Other output losses for baselines on the same harness: ``ce`` (SFT) and ``kd`` (Hinton: α T² KL_T +
(1-α) CE). ``layer_loss: none`` turns the layer term off.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...errors import LLMModulesError
from ...model.loss import next_token_mask
from .layers import LayerPair

LAYER_LOSSES = ("cosine", "cka", "none")
OUTPUT_LOSSES = ("cosine", "ce", "kl", "kd", "none")
NEEDS_SOURCE_LOGITS = ("kl", "kd")


def interpolated(source_taps: torch.Tensor, taps: Sequence[str], pair: LayerPair, interface: str) -> torch.Tensor:
    """The pair's source interface: source_taps [B, T, n, D_src] -> (1-λ)·h^(a) + λ·h^(b) [B, T, D_src] (fp32)."""
    def tap(layer: int) -> torch.Tensor:
        return source_taps[:, :, taps.index(f"{interface}:{layer}")].float()

    if pair.weight == 0.0 or pair.source_a == pair.source_b:
        return tap(pair.source_a)
    if pair.weight == 1.0:
        return tap(pair.source_b)
    return (1 - pair.weight) * tap(pair.source_a) + pair.weight * tap(pair.source_b)


def cosine_layer_loss(student: torch.Tensor, mapped: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - mean cosine over real tokens. student/mapped [B, T, D_tgt], mask [B, T] -> scalar."""
    cos = F.cosine_similarity(student.float(), mapped, dim=-1, eps=1e-8)
    weight = mask.to(cos.dtype)
    return ((1 - cos) * weight).sum() / weight.sum().clamp_min(1)


def cka_layer_loss(student: torch.Tensor, mapped: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - linear CKA of the token-token Gram matrices, per sequence, averaged. [B, T, D] x2, [B, T] -> scalar."""
    losses = []
    for row in range(student.shape[0]):
        keep = mask[row].bool()
        if int(keep.sum()) < 2:
            continue
        x = student[row, keep].float()
        y = mapped[row, keep]
        x, y = x - x.mean(0, keepdim=True), y - y.mean(0, keepdim=True)
        cross = (x.T @ y).pow(2).sum()
        norm = (x.T @ x).norm() * (y.T @ y).norm()
        losses.append(1 - cross / norm.clamp_min(1e-12))
    return torch.stack(losses).mean() if losses else student.sum() * 0.0


def output_loss_sum(kind: str, logits: torch.Tensor, targets: torch.Tensor,
                    source_logits: torch.Tensor | None = None, temperature: float = 2.0, alpha: float = 0.5) -> torch.Tensor:
    """The output term summed over answer tokens. logits [N, V], targets [N], source_logits [N, V] or None."""
    logits = logits.float()
    if kind == "ce":
        return F.cross_entropy(logits, targets, reduction="sum")
    if kind == "cosine":
        picked = logits.gather(-1, targets[:, None]).squeeze(-1)
        return (1 - picked / logits.norm(dim=-1).clamp_min(1e-12)).sum()
    if source_logits is None:
        raise LLMModulesError(f"output_loss {kind!r} needs the source's logits")
    source_logits = source_logits.float()
    if kind == "kl":
        return F.kl_div(logits.log_softmax(-1), source_logits.log_softmax(-1), log_target=True, reduction="sum")
    if kind == "kd":
        kl = F.kl_div((logits / temperature).log_softmax(-1), (source_logits / temperature).log_softmax(-1),
                      log_target=True, reduction="sum")
        return alpha * temperature**2 * kl + (1 - alpha) * F.cross_entropy(logits, targets, reduction="sum")
    raise LLMModulesError(f"output_loss {kind!r} is not one of {', '.join(OUTPUT_LOSSES)}")


@dataclass
class Objective:
    """The whole loss for one batch, given the student's taps and the source's.

    ``semantic_map`` M [D_tgt, D_src]; ``taps`` names the source tap order of ``source_taps``;
    ``source_head`` [V, D_src] turns the cached final source state into logits (kl, kd).
    """

    pairs: list[LayerPair]
    semantic_map: torch.Tensor
    taps: list[str]
    interface: str = "contribution"
    layer_loss: str = "cosine"
    output_loss: str = "cosine"
    layer_weight: float = 1.0
    output_weight: float = 1.0
    temperature: float = 2.0
    alpha: float = 0.5
    source_head: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.layer_loss not in LAYER_LOSSES:
            raise LLMModulesError(f"layer_loss {self.layer_loss!r} is not one of {', '.join(LAYER_LOSSES)}")
        if self.output_loss not in OUTPUT_LOSSES:
            raise LLMModulesError(f"output_loss {self.output_loss!r} is not one of {', '.join(OUTPUT_LOSSES)}")

    @property
    def uses_layers(self) -> bool:
        return self.layer_loss != "none" and self.layer_weight != 0 and bool(self.pairs)

    def __call__(
        self,
        student: dict[int, torch.Tensor],
        logits: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor,
        source_taps: torch.Tensor | None,
        active: Sequence[int] | None = None,
        num_items: int | torch.Tensor | None = None,
        layer_scale: float = 1.0,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """(loss, parts). student: {target layer: [B, T, D_tgt]}; logits [B, T, V]; labels [B, T] (-100 off);
        source_taps [B, T, n, D_src]; ``active``: the pairs' target layers whose layer loss counts (frontier).

        The output term is summed over answer tokens and divided by ``num_items`` (the Trainer's count over
        a whole accumulated batch) or by this batch's count; the layer term is a per-batch mean times
        ``layer_scale`` (1/accumulation steps in training).
        """
        parts: dict[str, float] = {}
        total = logits.new_zeros(())
        if self.uses_layers:
            matrix = self.semantic_map.to(logits.device)
            layer_terms = []
            for pair in self.pairs:
                if active is not None and pair.target not in active:
                    continue
                source = interpolated(source_taps, self.taps, pair, self.interface)
                mapped = source @ matrix.T  # [B, T, D_tgt]; M·h (its norm does not matter to either loss)
                fn = cosine_layer_loss if self.layer_loss == "cosine" else cka_layer_loss
                term = fn(student[pair.target], mapped, attention_mask)
                parts[f"layer_{pair.target}"] = float(term.detach())
                layer_terms.append(term)
            if layer_terms:
                layer = torch.stack(layer_terms).mean()
                parts["layer"] = float(layer.detach())
                total = total + self.layer_weight * layer_scale * layer
        if self.output_loss != "none" and self.output_weight != 0:
            keep = next_token_mask(labels)
            targets = labels[:, 1:][keep]
            chosen = logits[:, :-1][keep]
            source_logits = None
            if self.output_loss in NEEDS_SOURCE_LOGITS:
                if self.source_head is None or source_taps is None or "final" not in self.taps:
                    raise LLMModulesError(f"output_loss {self.output_loss!r} needs the source's final states and head")
                final = source_taps[:, :-1, self.taps.index("final")][keep].float()  # [N, D_src]
                source_logits = final @ self.source_head.to(final.device).T
                width = min(source_logits.shape[-1], chosen.shape[-1])  # padded heads: compare real ids only
                source_logits, chosen = source_logits[:, :width], chosen[:, :width]
            summed = output_loss_sum(self.output_loss, chosen, targets, source_logits, self.temperature, self.alpha)
            count = num_items if num_items is not None else keep.sum().clamp_min(1)
            out = summed / torch.as_tensor(count, device=summed.device)
            parts["output"] = float(out.detach())
            total = total + self.output_weight * out
        return total, parts


class Frontier:
    """Shallow-to-deep schedule (v2): ``phase(step, steps)`` -> the index of the pair that trains now.

    The steps are split evenly over the pairs, sorted by target depth; with ``enabled=False`` every pair
    trains at every step (``phase`` returns None).
    """

    def __init__(self, pairs: Sequence[LayerPair], enabled: bool) -> None:
        self.targets = sorted(p.target for p in pairs)
        self.enabled = enabled and len(self.targets) > 0

    def phase(self, step: int, steps: int) -> int | None:
        if not self.enabled:
            return None
        return min(len(self.targets) - 1, step * len(self.targets) // max(1, steps))

    def active(self, step: int, steps: int) -> list[int] | None:
        index = self.phase(step, steps)
        return None if index is None else [self.targets[index]]
