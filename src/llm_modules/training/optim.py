"""The optimizer's parameter groups of a composed model: one learning rate per named group.

Read by ``ComposedTrainer`` (``llm-modules train``) and by the fact-world loop (``evaluation/factworld/methods.py``),
so that both train the same groups (connector, target and a fusion model's mixture gate) at their own rates.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping

import torch
from torch import nn

# Groups trained beside the model on detached inputs (a call gate): their gradient is clipped on its own, so that
# adding one leaves every other weight's update, and so the trained model, exactly as without it.
CLIPPED_ALONE = ("call_gate",)


def parameter_groups(model: nn.Module, lrs: Mapping[str, float], weight_decay: float = 0.0,
                     decay_names: Collection[str] | None = None) -> list[dict]:
    """AdamW groups from ``model.trainable_parameter_groups(mixture=True)``: ``connector``, ``target``, ``mixture``
    (a fusion model's mixture gate) and ``call_gate``, each at ``lrs[name]`` (a call gate at the mixture's rate unless
    ``lrs`` names it), named by its ``group`` key; empty groups are left out.

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
        rate = lrs["mixture"] if group == "call_gate" and group not in lrs else lrs[group]
        groups += [{"params": chosen, "lr": rate, "group": group, "weight_decay": decay}
                   for chosen, decay in splits if chosen]
    return groups


def clip_gradients(groups: Iterable[dict], max_norm: float,
                   clip: Callable[[list[nn.Parameter], float], torch.Tensor] = torch.nn.utils.clip_grad_norm_,
                   ) -> torch.Tensor:
    """Clip the gradients of optimizer ``groups`` to ``max_norm``: every group together, except those of
    ``CLIPPED_ALONE``, each clipped alone. Returns the norm before clipping of the groups clipped together (the
    model's own: a call gate's gradient neither counts in it nor scales it)."""
    together, alone = [], {}
    for group in groups:
        name = group.get("group")
        (alone.setdefault(name, []) if name in CLIPPED_ALONE else together).extend(group["params"])
    for parameters in alone.values():
        clip(parameters, max_norm)
    return clip(together, max_norm)
