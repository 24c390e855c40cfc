"""How a composed model plugs into ``GenerationMixin.generate``: its own caches, and the source inputs of a step.

``forward`` creates the topology's cache (``BridgeCache``/``FusionCache``) on the first step, so ``generate()`` must
not make a ``DynamicCache``; what the source reads is given once, on the first step, and the topology says what
later steps need (``Topology.step_inputs``/``after_step``).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import GenerationMixin

SOURCE_INPUTS = ("source_input_ids", "source_attention_mask", "source_position_ids", "source_groups", "source_counts")


class ComposedGenerationMixin(GenerationMixin):
    """The generation hooks of ``LLMModulesForCausalLM`` (which sets ``self.topology``)."""

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # Our cache is a BridgeCache/FusionCache that forward() creates; generate() must not make a DynamicCache.
        return False

    @torch.no_grad()
    def generate(self, input_ids: torch.LongTensor | None = None, **kwargs: Any):
        """``GenerationMixin.generate``; a fusion model given the target's ids alone derives what the source reads."""
        self.topology.before_generate(self, input_ids, kwargs)
        return super().generate(input_ids, **kwargs)

    def prepare_inputs_for_generation(self, input_ids, next_sequence_length=None, cache=None, **kwargs):
        if self.config.leaky:
            # The leaky mask lets earlier positions read later ones, so nothing can be cached: recompute
            # the whole prefix per token, as the release does.
            cache, next_sequence_length = None, None
            kwargs["use_cache"] = False
        elif cache is not None and next_sequence_length is None:
            next_sequence_length = input_ids.shape[1] - cache.get_seq_length()
        source_inputs = {k: kwargs.pop(k, None) for k in SOURCE_INPUTS}
        inputs = super().prepare_inputs_for_generation(
            input_ids, next_sequence_length=next_sequence_length, cache=cache, **kwargs
        )
        inputs.setdefault("logits_to_keep", 1)
        inputs.pop("position_ids", None)  # recomputed from attention_mask in forward
        inputs.update(self.topology.step_inputs(self, cache, source_inputs))
        return inputs

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, *args, **kwargs):
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        self.topology.after_step(self, model_kwargs)
        return model_kwargs
