"""Counting weights: parameters and bytes of modules, shared parameters once, embedding tables apart."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def weight_bytes(modules: Sequence[nn.Module], skip: Sequence[nn.Module] = ()) -> int:
    """Bytes of parameters in ``modules``, leaving out ``skip`` (tables read one row per token)."""
    return sum(p.numel() * p.element_size() for p in unique_parameters(modules, skip))


def weight_count(modules: Sequence[nn.Module], skip: Sequence[nn.Module] = ()) -> int:
    """Number of parameters in ``modules``, leaving out ``skip``."""
    return sum(p.numel() for p in unique_parameters(modules, skip))


def unique_parameters(modules: Sequence[nn.Module], skip: Sequence[nn.Module]) -> list[nn.Parameter]:
    """The parameters of ``modules``, each once (tied weights are shared), without those of ``skip``."""
    skipped = {id(p) for module in skip for p in module.parameters()}
    seen: set[int] = set()
    found = []
    for module in modules:
        for parameter in module.parameters():
            if id(parameter) not in seen and id(parameter) not in skipped:
                seen.add(id(parameter))
                found.append(parameter)
    return found


def embedding_tables(*modules: nn.Module) -> list[nn.Module]:
    """The embedding tables inside ``modules`` (read one row per token, no matmul)."""
    return [m for module in modules for m in module.modules() if isinstance(m, nn.Embedding)]
