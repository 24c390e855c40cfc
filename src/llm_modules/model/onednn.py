"""Frozen float32 linear layers through oneDNN on the CPU: the same float32 arithmetic, a kernel that is not
slower for a few rows than for one.

Why this exists (measured on this project's 2-core AMD EPYC, torch 2.13, Qwen2-1.5B's shapes: ``python
benchmarks/catch_up_cost.py``): torch's float32 ``F.linear`` goes to MKL's sgemm, where a forward over 2-8 tokens
costs 1.8-1.9 times one token's. A deferral catch-up (``deferral.py``) is such a forward, over the tokens pending
since the source's last call, so in float32 each call cost about two decoding steps. Through oneDNN's inner
product, which torch already uses for bfloat16, one token takes 0.21 s instead of 0.38 s and 4 tokens 1.47 times
one. torch offers no switch that sends float32 linears to oneDNN at full precision (its oneDNN float32 path is for
reduced-precision settings, ``torch.backends.mkldnn.matmul.fp32_precision``), so the swap is done here, per module,
in full float32.

``use_onednn_linears(model)`` swaps every *frozen* float32 ``nn.Linear`` on the CPU for a ``OneDNNLinear`` holding
the same weight in oneDNN's tensor format. It is for decoding: a swapped layer has no trainable weight, and where a
gradient must flow through it to its input (a frozen layer inside a trained model) it falls back to ``F.linear``
on a dense copy, slower and exact. The swapped weights are not strided tensors, so they stay out of the model's
``state_dict``: a composed model saves only what trained (``serialization.py``), never the frozen parents. A head
tied to the input embeddings gets its own oneDNN copy (the embedding stays): its memory is held twice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LLMModulesError

CPU_LINEARS = ("torch", "onednn")
CPU_LINEAR_HELP = ("onednn: float32 linear layers through oneDNN on the CPU, the same numbers faster (model/onednn.py; "
                   "benchmarks/defer_speed.py --linear onednn measures it); torch: torch's own (the default)")


class OneDNNLinear(nn.Module):
    """``y = x W^T + b`` with W (``[out, in]``) kept in oneDNN's format; input ``[..., in]`` -> output ``[..., out]``."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # Named `weight` and `bias` so code that reads `layer.weight.dtype` keeps working; not persistent: see above.
        self.register_buffer("weight", linear.weight.detach().to_mkldnn(), persistent=False)
        bias = None if linear.bias is None else linear.bias.detach().to_mkldnn()
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            bias = None if self.bias is None else self.bias.to_dense()
            return F.linear(x, self.weight.to_dense(), bias)
        if x.dtype != torch.float32:
            raise TypeError(f"OneDNNLinear computes float32; got a {x.dtype} input (swap after any .to(dtype))")
        return torch._C._nn.mkldnn_linear(x.contiguous().to_mkldnn(), self.weight, self.bias).to_dense()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def swappable(module: nn.Module) -> bool:
    """A plain ``nn.Linear`` whose float32 CPU weight is frozen."""
    weight = getattr(module, "weight", None)
    return (type(module) is nn.Linear and weight is not None and not weight.requires_grad
            and weight.dtype == torch.float32 and weight.device.type == "cpu")


def use_onednn_linears(model: nn.Module) -> int:
    """Swap every frozen float32 CPU ``nn.Linear`` inside ``model`` (in place) for a ``OneDNNLinear``; return how many.

    Returns 0 where torch was built without oneDNN. Trainable layers and other dtypes are left as they are, so call
    it on a model that is done training (``model.requires_grad_(False)`` freezes every layer).
    """
    if not torch.backends.mkldnn.is_available():
        return 0
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if swappable(child):
                setattr(parent, name, OneDNNLinear(child))
                swapped += 1
    return swapped


def check_cpu_linear(cpu_linear: str, device: str) -> None:
    """The ``--cpu-linear`` choice is one of ``CPU_LINEARS`` and, if ``"onednn"``, the device is the CPU."""
    if cpu_linear not in CPU_LINEARS:
        raise LLMModulesError(f"--cpu-linear takes {' or '.join(map(repr, CPU_LINEARS))}; got {cpu_linear!r}")
    if cpu_linear == "onednn" and str(device) != "cpu":
        raise LLMModulesError(f"--cpu-linear onednn is for --device cpu (oneDNN is a CPU library); got {device}")


def for_decoding(model: nn.Module, cpu_linear: str, device: str) -> int:
    """Apply ``--cpu-linear`` to a model that will only decode from now on (``llm-modules generate``, ``serve``):
    ``"onednn"`` freezes it and swaps its float32 linears; ``"torch"`` leaves it. Returns how many were swapped."""
    check_cpu_linear(cpu_linear, device)
    return use_onednn_linears(model.requires_grad_(False)) if cpu_linear == "onednn" else 0
