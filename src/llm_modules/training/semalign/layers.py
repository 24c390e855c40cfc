"""Where SemAlign reads and writes: decoder layers, their taps, Gradient x Activation, and the depth map.

Layers are numbered 1..L as in the paper. A layer's *interface* (what is aligned, and what the
attribution scores) is one of

- ``contribution`` (default): what the layer adds to the residual stream, ``h_out - h_in``: the sum of
  its sublayer outputs (attention, MLP) before their residual adds;
- ``mlp``: the output of the layer's MLP sublayer alone, before its residual add;
- ``output``: the layer's output, the residual stream itself (what Captum's LayerGradientXActivation
  reads on a decoder layer).

Gradient x Activation is written here rather than taken from Captum: Captum's layer attribution
takes one forward and backward pass per layer, where forward hooks give every layer's activation and
gradient from a single pass (the sums are the same).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ...errors import LLMModulesError
from ...model.masks import positions_from_padding

INTERFACES = ("contribution", "mlp", "output")


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, the ModuleList of decoder blocks) of any transformers causal LM (PEFT-wrapped too)."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    count = getattr(text, "num_hidden_layers", None) or getattr(text, "num_layers", None) or getattr(text, "n_layer", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and (count is None or len(module) == count):
            return name, module
    raise LLMModulesError(f"could not find the decoder layers of {type(model).__name__} ({count} expected)")


def layer_count(model: nn.Module) -> int:
    return len(decoder_layers(model)[1])


def _hidden(value):
    return value[0] if isinstance(value, (tuple, list)) else value


class LayerTaps:
    """Forward hooks that keep each listed layer's interface: ``values[layer]`` [B, T, D].

    With ``keep_grad`` the layer outputs retain their gradient after ``backward()``
    (``gradients[layer]``: dLoss/dh_out [B, T, D], also the gradient of the layer's contribution).
    Use as a context manager; the hooks are removed on exit.
    """

    def __init__(self, model: nn.Module, layers: Iterable[int], interface: str = "contribution",
                 keep_grad: bool = False) -> None:
        if interface not in INTERFACES:
            raise LLMModulesError(f"interface {interface!r} is not one of {', '.join(INTERFACES)}")
        self.model, self.interface, self.keep_grad = model, interface, keep_grad
        self.layers = sorted(set(int(i) for i in layers))
        _, self.blocks = decoder_layers(model)
        bad = [i for i in self.layers if not 1 <= i <= len(self.blocks)]
        if bad:
            raise LLMModulesError(f"layers {bad} are out of range 1..{len(self.blocks)}")
        self.values: dict[int, torch.Tensor] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> LayerTaps:
        for layer in self.layers:
            block = self.blocks[layer - 1]
            if self.interface == "mlp":
                mlp = getattr(block, "mlp", None)
                if mlp is None:
                    raise LLMModulesError(f"{type(block).__name__} has no 'mlp' sublayer; use interface: contribution")
                self._handles.append(mlp.register_forward_hook(self._mlp_hook(layer)))
            if self.interface != "mlp" or self.keep_grad:
                self._handles.append(block.register_forward_hook(self._block_hook(layer), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _mlp_hook(self, layer: int) -> Callable:
        def hook(module, args, output):
            self.values[layer] = _hidden(output)
        return hook

    def _block_hook(self, layer: int) -> Callable:
        def hook(module, args, kwargs, output):
            out = _hidden(output)
            if self.keep_grad and out.requires_grad:
                out.retain_grad()
                self._outputs[layer] = out
            if self.interface == "output":
                self.values[layer] = out
            elif self.interface == "contribution":
                hidden_in = args[0] if args else kwargs["hidden_states"]
                self.values[layer] = out - hidden_in
        return hook

    def gradients(self, layer: int) -> torch.Tensor:
        out = self._outputs.get(layer)
        if out is None or out.grad is None:
            raise LLMModulesError(f"no gradient was kept for layer {layer}; run with keep_grad=True and call backward()")
        return out.grad


# ------------------------------------------------------------------------------------ attribution
def gradient_x_activation(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    interface: str = "contribution",
    reduce: str = "abs",
) -> list[float]:
    """Per-layer Gradient x Activation of the supervised loss, layers 1..L: a list of L scores.

    batches: dicts with input_ids/attention_mask/labels [B, T]; loss_fn(logits [B, T, V], labels) -> scalar.
    Each layer's score sums ``activation * dLoss/dactivation`` over channels and real tokens (``reduce``:
    ``abs`` sums absolute values, ``signed`` sums the signed products and takes the absolute value at
    the end; the paper leaves this open) and averages over batches. The model's parameters need no grad.
    """
    if reduce not in ("abs", "signed"):
        raise LLMModulesError(f"attribution reduce {reduce!r} is not one of abs, signed")
    count = layer_count(model)
    totals = torch.zeros(count, dtype=torch.float64)
    seen = 0
    was_training = model.training
    model.eval()
    for batch in batches:
        mask = batch["attention_mask"]
        with LayerTaps(model, range(1, count + 1), interface, keep_grad=True) as taps:
            embeddings = model.get_input_embeddings()
            handle = embeddings.register_forward_hook(lambda m, a, out: out.requires_grad_(True))
            try:
                logits = model(input_ids=batch["input_ids"], attention_mask=mask,
                               position_ids=positions_from_padding(mask)).logits
                loss_fn(logits, batch["labels"]).backward()
            finally:
                handle.remove()
            for layer in range(1, count + 1):
                product = taps.values[layer].detach().float() * taps.gradients(layer).float()  # [B, T, D]
                product = product * mask[..., None].to(product.dtype)
                totals[layer - 1] += float(product.abs().sum() if reduce == "abs" else product.sum())
        seen += 1
        model.zero_grad(set_to_none=True)
    model.train(was_training)
    if not seen:
        raise LLMModulesError("attribution needs at least one batch of transfer data")
    return [abs(v) / seen for v in totals.tolist()]


# ------------------------------------------------------------------------------------ depth map
def depth_map(k: int, source_layers: int, target_layers: int) -> int:
    """ℓ(k) = max(1, ⌊L_src/L_tgt · k⌋): the source layer paired with target layer k (1-based)."""
    return max(1, (source_layers * k) // target_layers)


def partner(critical: int, source_layers: int, target_layers: int) -> int:
    """k† = min{k : ℓ(k) ≥ ℓ*}: the target layer a critical source layer ℓ* goes to (L_tgt if none)."""
    for k in range(1, target_layers + 1):
        if depth_map(k, source_layers, target_layers) >= critical:
            return k
    return target_layers


def interpolation(k: int, source_layers: int, target_layers: int) -> tuple[int, int, float]:
    """(a, b, λ) with the source interface for target layer k = (1-λ)·h^(a) + λ·h^(b).

    ρ = k/L_tgt, u = L_src·ρ, a = max(1, min(⌊u⌋, L_src-1)), b = a+1, λ = clip(u-a, 0, 1).
    A one-layer source has only a = b = 1.
    """
    if source_layers == 1:
        return 1, 1, 0.0
    u = source_layers * k / target_layers
    a = max(1, min(math.floor(u), source_layers - 1))
    return a, a + 1, min(1.0, max(0.0, u - a))


@dataclass(frozen=True)
class LayerPair:
    """Target layer ``target`` learns the source interface (1-weight)·h^(source_a) + weight·h^(source_b)."""

    target: int
    source_a: int
    source_b: int
    weight: float
    critical: int  # the critical source layer ℓ* that chose this pair (attribution rank order)

    def source_layers(self) -> list[int]:
        return sorted({self.source_a, self.source_b} if self.weight not in (0.0, 1.0) else
                      {self.source_b if self.weight == 1.0 else self.source_a})

    def to_dict(self) -> dict:
        return asdict(self)


def choose_pairs(scores: Sequence[float], target_layers: int, count: int,
                 critical: Sequence[int] | None = None) -> list[LayerPair]:
    """Pairs for the ``count`` most attributed source layers (or the given ``critical`` ones), by target depth.

    Each critical layer ℓ* goes to k† (:func:`partner`) and reads the interpolated source interface of
    that depth (:func:`interpolation`). Two critical layers that land on the same target layer make one
    pair; the next-ranked layer is taken instead, so ``count`` target layers are trained where possible.
    """
    source_layers = len(scores)
    ranked = list(critical) if critical else sorted(range(1, source_layers + 1), key=lambda i: -scores[i - 1])
    bad = [i for i in ranked if not 1 <= i <= source_layers]
    if bad:
        raise LLMModulesError(f"critical source layers {bad} are out of range 1..{source_layers}")
    pairs: dict[int, LayerPair] = {}
    for layer in ranked:
        if len(pairs) >= count:
            break
        k = partner(layer, source_layers, target_layers)
        if k not in pairs:
            a, b, weight = interpolation(k, source_layers, target_layers)
            pairs[k] = LayerPair(k, a, b, weight, layer)
    return [pairs[k] for k in sorted(pairs)]


def plot_pairs(scores: Sequence[float], pairs: Sequence[LayerPair], target_layers: int, path: str | Path) -> Path:
    """Attribution per source layer (bars; critical ones highlighted) and the chosen pairs as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    critical = {p.critical for p in pairs}
    layers = list(range(1, len(scores) + 1))
    left.bar(layers, scores, color=["tab:red" if i in critical else "tab:gray" for i in layers])
    left.set_xlabel("source layer")
    left.set_ylabel("Gradient x Activation")
    left.set_title("attribution (red: critical layers)")
    for pair in pairs:
        source = (1 - pair.weight) * pair.source_a + pair.weight * pair.source_b
        right.plot([0, 1], [source, pair.target], marker="o", color="tab:blue")
        right.annotate(f"{pair.target} <- {source:.3g}", (1, pair.target), xytext=(4, 0), textcoords="offset points")
    right.set_xticks([0, 1], ["source", "target"])
    right.set_ylim(0, max(len(scores), target_layers) + 1)
    right.set_ylabel("layer")
    right.set_title("pairs (source depth, interpolated)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return Path(path)

