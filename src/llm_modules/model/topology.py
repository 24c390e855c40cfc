"""What a topology is: the part of the composed model that differs between the bridge and fusion.

``LLMModulesForCausalLM`` asks its topology, chosen once at construction (``builder.topology_for``), every question
whose answer depends on how the source is wired in: which target to load, which modules to add and freeze, how a
forward runs, what generation must feed each step and what a saved folder must hold. The model itself never
branches on ``config.topology``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from ..errors import LLMModulesError
from .configuration import TARGET_ONLY_GATES
from .heads import MIXTURE_HEADS, MixtureHead, OutputHead

if TYPE_CHECKING:
    from .configuration import LLMModulesConfig


@dataclass
class TopologyOutput:
    """One forward's result: logits [B, t, V] (mixed log-probabilities for a mixture head), the base head's own
    logits [B, t, V] (mixture heads) or None, the decoding cache, the connector's attention maps (bridge), and a
    mixture gate's source weight [B, t] (mixture heads; training prices it) or None."""

    logits: torch.Tensor
    head_logits: torch.Tensor | None
    cache: Any
    attentions: list[torch.Tensor] | None = None
    source_weight: torch.Tensor | None = None
    call_gate_loss: torch.Tensor | None = None  # [B, t]: a call gate's loss at each position (training)


@dataclass
class ComposeParts:
    """What ``compose()`` needs from a topology: the target, the tokenizer(s) and the vocabulary."""

    target: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source_tokenizer: PreTrainedTokenizerBase | None
    vocab_size: int
    shared_tokenizer: bool


class Topology:
    """The interface; ``bridge.BridgeTopology`` and ``fusion.FusionTopology`` implement it."""

    name: str
    new_module_prefixes: tuple[str, ...]  # parameters of the new cross-attention modules (optimizer group "connector")
    states_replace_ids: bool = False  # forward may take cached source states without the token ids
    mixture_prefix: str | None = None  # parameters of the mixture gate, when it has its own optimizer group

    # ------------------------------------------------------------------------------------- building
    def compose_parts(self, source: Any, target: Any, tokenizer: Any, source_tokenizer: Any,
                      source_config: PreTrainedConfig, target_init: str, options: dict[str, Any]) -> ComposeParts:
        """Load the target and tokenizers for ``compose()``; may fill topology defaults into ``options``."""
        raise NotImplementedError

    def random_target(self, target_config: PreTrainedConfig) -> PreTrainedModel:
        """A target of this shape with random weights (the saved weights or ``from_pretrained`` fill it)."""
        raise NotImplementedError

    def saved_target(self, config: LLMModulesConfig, target: Any, folder: Path) -> PreTrainedModel:
        """The target ``from_pretrained`` rebuilds: from its stored config or its reference (or ``target=``)."""
        raise NotImplementedError

    def build(self, model: nn.Module, config: LLMModulesConfig, d_source: int, d_target: int,
              target: PreTrainedModel) -> None:
        """Add the new modules (cross-attention, head) to ``model``, before ``post_init``."""
        raise NotImplementedError

    def attach(self, model: nn.Module) -> None:
        """After the target is attached: anything that wires into it (fusion's hooks, LoRA, the processor)."""

    def freeze(self, model: nn.Module) -> None:
        """Freeze the target's weights that do not train."""

    def keep_frozen_in_eval(self, model: nn.Module) -> None:
        """``model.train()``: put back into eval mode what is frozen (no dropout in a frozen target)."""

    def mixture_head(self, base: OutputHead | None, config: LLMModulesConfig, d_target: int, d_source: int,
                     fallback: OutputHead) -> OutputHead:
        """The head: a mixture over ``base`` where ``config.head`` asks for one, else ``fallback``."""
        if config.head not in MIXTURE_HEADS:
            return fallback
        if config.source_layer != -1:
            raise LLMModulesError(f"head={config.head!r} reads the source's last layer; use source_layer=-1")
        return MixtureHead(base, d_target, d_source, pointer=config.head == "source_pointer",
                           confidence=config.mixture_gate in ("confidence", "target_confidence"),
                           target_only=config.mixture_gate in TARGET_ONLY_GATES, call_gate=bool(config.call_gate))

    # --------------------------------------------------------------------------------------- reading
    def input_embeddings(self, model: nn.Module) -> nn.Module | None:
        raise NotImplementedError

    def output_embeddings(self, model: nn.Module) -> nn.Module | None:
        raise NotImplementedError

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        """The cross-attention layers: the bridge's connector stack or the fusion blocks."""
        raise NotImplementedError

    def new_modules(self, model: nn.Module) -> nn.Module:
        """The new cross-attention modules (cast to a requested dtype on load)."""
        raise NotImplementedError

    def source_states(self, model: nn.Module, input_ids: torch.LongTensor, attention_mask: torch.Tensor,
                      position_ids: torch.LongTensor, cache: Any, layers: tuple[int, ...] | None) -> torch.Tensor:
        """What the model reads of the source ([B, T, d_s] bridge, [B, T, L, d_s] fusion)."""
        raise NotImplementedError

    def forward(self, model: nn.Module, input_ids: torch.LongTensor | None, attention_mask: torch.Tensor,
                position_ids: torch.LongTensor, cache: Any, use_cache: bool, logits_to_keep: int,
                output_attentions: bool, inputs: dict[str, Any]) -> TopologyOutput:
        """One forward up to the logits; ``inputs``: ``source_states`` and the ``source_*`` tensors."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------ generation
    def before_generate(self, model: nn.Module, input_ids: torch.LongTensor | None, kwargs: dict[str, Any]) -> None:
        """Complete ``generate()``'s keyword arguments in place (fusion derives what the source reads)."""

    def step_inputs(self, model: nn.Module, cache: Any, source_inputs: dict[str, Any]) -> dict[str, Any]:
        """The ``source_*`` inputs one generation step passes to ``forward`` (none by default)."""
        return {}

    def after_step(self, model: nn.Module, model_kwargs: dict[str, Any]) -> None:
        """Update ``generate()``'s keyword arguments after a step, in place."""

    # ----------------------------------------------------------------------------------- save / card
    def check_saveable(self, model: nn.Module) -> None:
        """Raise where a saved folder could not rebuild the model."""

    def save_extra(self, model: nn.Module, folder: Path) -> None:
        """Write what else the folder needs (fusion: the source's own tokenizer)."""

    def describe(self, config: LLMModulesConfig) -> str:
        """One line for the model card."""
        raise NotImplementedError
