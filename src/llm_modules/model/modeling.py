"""``LLMModulesForCausalLM``: a frozen source model read by a small target, as one HF model.

The model is the same whatever the wiring; what differs lives in its topology, chosen once (``topologies.py``):

- ``bridge.py``: the paper's released architecture. The source's states pass through Enhanced
  Cross-Attention into the target's ``inputs_embeds``; a head predicts source tokens.
- ``fusion.py``: the target keeps its tokenizer, embeddings and head; gated cross-attention blocks
  inserted before some of its layers read the source (Flamingo/CALM); ``processing.py`` aligns two tokenizers.

The other parts: ``heads.py`` (output heads owning their weights), ``loss.py``, ``deferral.py``, ``decoding.py``
(``generate()`` plumbing), ``serialization.py`` (save/load: trainable weights only; the source and a frozen target
are referenced), ``builder.py`` (``compose``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..errors import LLMModulesError
from .builder import compose_model
from .configuration import LLMModulesConfig
from .decoding import ComposedGenerationMixin
from .loading import ModelLike, config_from_dict
from .loss import composed_lm_loss
from .masks import positions_from_padding
from .serialization import load_composed, save_composed
from .topologies import topology_for

# Families whose learned absolute position table is a hard length limit.
ABSOLUTE_POSITION_TYPES = ("gpt2", "gpt_neo", "opt")


@dataclass
class ComposedCausalLMOutput(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` plus ``head_logits`` [B, T, V]: with a mixture head (source_mix, source_pointer)
    in training mode, the base head's own logits. Training adds their cross-entropy to the mixture's, so that the
    base head learns every token whatever the gate does (in training mode ``loss`` already includes it when
    ``labels`` are given; in evaluation mode ``loss`` is the mixture's alone)."""

    head_logits: torch.FloatTensor | None = None
    # [B, T] (training): source_call_price x the gate's source weight, plus a call gate's loss (model/heads.py)
    source_call_cost: torch.FloatTensor | None = None


def _hidden_size(config: PreTrainedConfig) -> int:
    return int(config.get_text_config().hidden_size)


def with_row_major_strides(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` with the strides of a fresh row-major tensor of its shape (a copy only where they differ).

    A last-position slice of a longer [1, P, d] tensor is [1, 1, d] with stride P*d on its first dimension: torch
    counts it as contiguous, but on a CPU a bf16 linear reads it about 50x slower (Qwen2.5-1.5B's head: 2.3 s against
    0.045 s; ``benchmarks/strided_head.py``). Deferral's catch-up hands the source's head exactly such slices."""
    expected, step = [], 1
    for size in reversed(tensor.shape):
        expected.append(step)
        step *= size
    if tuple(reversed(expected)) == tensor.stride():
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


class LLMModulesForCausalLM(PreTrainedModel, ComposedGenerationMixin):
    """A frozen source model read by a small target (bridge or fusion topology).

    Build with :meth:`compose`; reload with :meth:`from_pretrained` (or ``AutoModelForCausalLM``
    once ``llm_modules`` is imported).
    """

    config_class = LLMModulesConfig
    base_model_prefix = "llm_modules"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    def __init__(
        self,
        config: LLMModulesConfig,
        source: PreTrainedModel | None = None,
        target: PreTrainedModel | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        source_tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> None:
        super().__init__(config)
        topology = topology_for(config.topology)
        if target is None:
            if not config.target_config:
                raise LLMModulesError("LLMModulesConfig has no target_config; build the model with compose()")
            target = topology.random_target(config_from_dict(config.target_config))
        source_config = source.config if source is not None else None
        if source_config is None:
            if not config.source_config:
                raise LLMModulesError("LLMModulesConfig has no source_config; build the model with compose()")
            source_config = config_from_dict(config.source_config)
        self.source_vocab_size = int(source_config.get_text_config().vocab_size)  # rows the source can embed
        topology.build(self, config, _hidden_size(source_config), _hidden_size(target.config), target)
        self.post_init()
        # Attached after post_init so that HF weight initialisation never touches pretrained weights.
        self.target = target
        self.source = source
        self.tokenizer = tokenizer
        self.source_tokenizer = source_tokenizer if source_tokenizer is not None else tokenizer
        self.topology = topology
        self.last_deferral = None  # deferral decoding's counts of the last generation (deferral.DeferralState)
        topology.attach(self)
        self._freeze()

    # ----------------------------------------------------------------------------------------- build
    @classmethod
    def compose(
        cls,
        source: ModelLike | None,
        target: ModelLike | PreTrainedConfig,
        *,
        tokenizer: PreTrainedTokenizerBase | str | None = None,
        source_tokenizer: PreTrainedTokenizerBase | str | None = None,
        source_config: PreTrainedConfig | None = None,
        source_revision: str | None = None,
        source_dtype: str | None = None,
        target_init: str = "pretrained",
        **options: Any,
    ) -> LLMModulesForCausalLM:
        """Compose a frozen ``source`` and a ``target`` (hub ids, folders or loaded models).

        options: any field of ``ComposeOptions`` (``compose(source, target, **options.to_kwargs())`` takes one
        whole); ``None`` takes the topology's default. ``topology="bridge"`` (default: the paper's graph; the model reads
        and writes source tokens, ``tokenizer`` defaults to the source's) or ``"fusion"`` (the target keeps its
        own tokenizer, embeddings and head; ``tokenizer`` defaults to the target's, ``source_tokenizer`` to the
        source's; gates default to tanh at 0, cross-attention heads to the target's).
        ``source=None`` with ``source_config`` builds a model that runs only on precomputed ``source_states``
        (training from the source-state cache).
        """
        return compose_model(cls, source, target, tokenizer, source_tokenizer, source_config, source_revision,
                             source_dtype, target_init, options)

    def _freeze(self) -> None:
        if self.source is not None:
            self.source.eval()
            self.source.requires_grad_(False)
        self.topology.freeze(self)
        # Frozen weights are never saved; Trainer reads this set to know their absence is expected.
        self._keys_to_ignore_on_save = set(self.state_dict()) - set(self.trainable_state_dict())

    def train(self, mode: bool = True) -> LLMModulesForCausalLM:
        super().train(mode)
        if self.source is not None:
            self.source.eval()  # frozen: no dropout, ever
        self.topology.keep_frozen_in_eval(self)
        return self

    def _init_weights(self, module: nn.Module) -> None:
        """Keep PyTorch's default initialisation (as the release); tanh gates start at 0 in their constructor."""

    def get_input_embeddings(self) -> nn.Module | None:
        return self.topology.input_embeddings(self)

    def get_output_embeddings(self) -> nn.Module | None:
        return self.topology.output_embeddings(self)

    @property
    def blocks(self) -> nn.ModuleList:
        """The cross-attention layers: the bridge's connector stack or the fusion blocks."""
        return self.topology.blocks(self)

    def trainable_parameter_groups(self, mixture: bool = False) -> dict[str, list[nn.Parameter]]:
        """Named optimizer groups: ``connector`` (the new cross-attention modules) and ``target`` (the target's
        weights that train; for the bridge also its new head and mixture gate, as the paper's graph trains them).
        ``mixture=True``: a fusion model's mixture gate is a third group, ``mixture``, with its own learning rate, and
        its call gate (``call_gate``) a fourth, ``call_gate``: it learns beside the model and nothing else reads it,
        so it is clipped on its own (``training/optim.py``)."""
        groups: dict[str, list[nn.Parameter]] = {"connector": [], "target": [],
                                                 **({"mixture": [], "call_gate": []} if mixture else {})}
        own_group = self.topology.mixture_prefix if mixture else None
        for name, parameter in self.named_parameters():
            if parameter.requires_grad:
                group = "connector" if name.startswith(self.topology.new_module_prefixes) else "target"
                if own_group and name.startswith(own_group):
                    group = "call_gate" if name.startswith(own_group + "call_gate.") else "mixture"
                groups[group].append(parameter)
        return groups

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights ``save_pretrained`` writes: every parameter that trains."""
        return {name: p.detach() for name, p in self.named_parameters() if p.requires_grad}

    def gate_values(self) -> list[float]:
        """Mean opening of each cross-attention gate at the last forward pass (NaN before any), for plots and pages."""
        return [float("nan") if layer.last_gate is None else float(layer.last_gate) for layer in self.blocks]

    @property
    def source_hidden_size(self) -> int:
        return _hidden_size(config_from_dict(self.config.source_config))

    # --------------------------------------------------------------------------------------- forward
    def source_states(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                      position_ids: torch.LongTensor | None = None, cache=None,
                      layers: tuple[int, ...] | None = None) -> torch.Tensor:
        """Frozen source states the model reads: [B, T] source ids -> [B, T, d_s] for the bridge (its
        ``source_layer``), [B, T, L, d_s] for fusion (its read layers, + the last one for mixture heads).
        This is what the source-state cache stores."""
        if self.source is None:
            raise LLMModulesError("this model was built without its source (cache-only); pass source_states=..., or "
                                  "reload it with the source (from_pretrained(dir) loads config.source_name_or_path)")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if position_ids is None:
            position_ids = positions_from_padding(attention_mask)[:, -input_ids.shape[1]:]
        return self.topology.source_states(self, input_ids, attention_mask, position_ids, cache, layers)

    def source_logits(self, states: torch.Tensor) -> torch.Tensor:
        """The frozen source's own head: [B, T, d_s] -> fp32 logits [B, T, V] over the model's vocabulary (entries
        beyond the source's vocabulary at the minimum: the source never predicts them)."""
        if self.source is None:
            raise LLMModulesError(f"head={self.config.head!r} needs the source's output head; load the source")
        head = self.source.get_output_embeddings()
        logits = head(with_row_major_strides(states.to(head.weight.dtype))).float()
        missing = self.config.vocab_size - logits.shape[-1]
        if missing > 0:
            logits = F.pad(logits, (0, missing), value=torch.finfo(logits.dtype).min)
        return logits[..., : self.config.vocab_size]

    def _call_cost(self, out) -> torch.Tensor | None:
        """[B, T] what training adds at each position for the source's calls: ``source_call_price`` nats x the
        mixture gate's source weight, plus a call gate's own loss; None where neither applies."""
        price = float(self.config.source_call_price or 0.0)
        terms = [price * out.source_weight] if price and out.source_weight is not None else []
        if out.call_gate_loss is not None:
            terms.append(out.call_gate_loss)
        return sum(terms) if terms else None

    def _check_length(self, positions: torch.Tensor) -> None:
        target = self.target.config
        if target.model_type in ABSOLUTE_POSITION_TYPES and positions.numel() and int(positions.max()) >= int(
                target.max_position_embeddings):
            raise LLMModulesError(
                f"sequence of {int(positions.max()) + 1} tokens exceeds the target's max_position_embeddings="
                f"{target.max_position_embeddings} ({target.model_type} has learned absolute positions); filter or "
                "truncate the data")

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        source_states: torch.Tensor | None = None,
        cache: Any = None,
        use_cache: bool | None = None,
        position_ids: torch.LongTensor | None = None,
        logits_to_keep: int = 0,
        output_attentions: bool = False,
        return_dict: bool = True,
        source_input_ids: torch.LongTensor | None = None,
        source_attention_mask: torch.Tensor | None = None,
        source_position_ids: torch.LongTensor | None = None,
        source_groups: torch.LongTensor | None = None,
        source_counts: torch.LongTensor | None = None,
        **kwargs,
    ) -> ComposedCausalLMOutput:
        """input_ids [B, T]: source tokens (bridge) or target tokens (fusion); labels [B, T], -100 ignored, shifted here.

        Bridge: ``source_states`` [B, T, d_s] replaces running the source. Fusion: the ``source_*`` tensors come
        from ``model.processor`` (or are derived from ``input_ids``); ``source_states`` [B, S, L, d_s] from the cache.
        With ``cache`` (``BridgeCache``/``FusionCache``) only the new positions are given and ``attention_mask``
        covers past + new. ``logits_to_keep=k`` computes the head on the last k positions only (decoding).
        """
        if input_ids is None and (source_states is None or not self.topology.states_replace_ids):
            raise LLMModulesError("forward needs input_ids" + (" or source_states" if self.topology.states_replace_ids else ""))
        reference = input_ids if input_ids is not None else source_states
        batch, length = reference.shape[:2]
        use_cache = bool(use_cache) and not self.config.leaky
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(batch, past + length, dtype=torch.long, device=reference.device)
        if attention_mask.shape[1] != past + length:
            raise LLMModulesError(f"attention_mask covers {attention_mask.shape[1]} positions but past + new = "
                                  f"{past} + {length}")
        position_ids = positions_from_padding(attention_mask)[:, past:]
        self._check_length(position_ids)
        inputs = dict(source_input_ids=source_input_ids, source_attention_mask=source_attention_mask,
                      source_position_ids=source_position_ids, source_groups=source_groups,
                      source_counts=source_counts, source_states=source_states)
        out = self.topology.forward(self, input_ids, attention_mask, position_ids, cache, use_cache, logits_to_keep,
                                    output_attentions, inputs)
        head_logits = out.head_logits if self.training else None  # evaluation reports the mixture's loss alone
        call_cost = self._call_cost(out) if self.training else None
        loss = composed_lm_loss(out.logits, head_logits, labels, call_cost=call_cost) if labels is not None else None
        return ComposedCausalLMOutput(
            loss=loss,
            logits=out.logits,
            head_logits=head_logits,
            source_call_cost=call_cost,
            cache=out.cache if use_cache else None,
            attentions=tuple(out.attentions) if output_attentions and out.attentions else None,
        )

    # ------------------------------------------------------------------------------------- save/load
    def save_pretrained(self, save_directory: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None,
                        **kwargs) -> None:
        """Config, trainable weights (safetensors), tokenizer(s), generation config and a model card; the source
        (and a fusion model's frozen target) is referenced by name or path, never copied."""
        save_composed(self, save_directory, state_dict)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *model_args,
        config: LLMModulesConfig | None = None,
        source: ModelLike | None = None,
        target: ModelLike | None = None,
        load_source: bool = True,
        **kwargs,
    ) -> LLMModulesForCausalLM:
        """Rebuild a saved composed model: the source from ``config.source_name_or_path`` (or ``source=``),
        the target from its stored config (bridge) or its reference (fusion, or ``target=``), then the saved
        trainable weights on top. ``load_source=False`` skips the source (training or evaluation from cached states).
        """
        return load_composed(cls, pretrained_model_name_or_path, config, source, target, load_source, kwargs)


AutoConfig.register(LLMModulesConfig.model_type, LLMModulesConfig)
AutoModelForCausalLM.register(LLMModulesConfig, LLMModulesForCausalLM)
