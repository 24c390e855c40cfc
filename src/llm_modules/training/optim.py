"""The optimizer's parameter groups of a composed model: one learning rate per named group.

Read by ``ComposedTrainer`` (``llm-modules train``) and by the fact-world loop (``evaluation/factworld/methods.py``),
so that both train the same groups (connector, target and a fusion model's mixture gate) at their own rates.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from torch import nn


def parameter_groups(model: nn.Module, lrs: Mapping[str, float], weight_decay: float = 0.0,
                     decay_names: Collection[str] | None = None) -> list[dict]:
    """AdamW groups from ``model.trainable_parameter_groups(mixture=True)``: ``connector``, ``target`` and ``mixture``
    (a fusion model's mixture gate), each at ``lrs[name]``, named by its ``group`` key; empty groups are left out.

    ``decay_names`` (parameter names, e.g. ``Trainer.get_decay_parameter_names``): each group splits in two, the
    named parameters decaying by ``weight_decay`` and the others (biases, norms) not; None: all decay by it.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    groups = []
    for group, parameters in model.trainable_parameter_groups(mixture=True).items():
        if decay_names is None:
            splits = [(parameters, weight_decay)]
        else:
            splits = [([p for p in parameters if names[id(p)] in decay_names], weight_decay),
                      ([p for p in parameters if names[id(p)] not in decay_names], 0.0)]
        groups += [{"params": chosen, "lr": lrs[group], "group": group, "weight_decay": decay}
                   for chosen, decay in splits if chosen]
    return groups
