"""Fusion topology: the target keeps its tokenizer, embeddings and head, and reads the source through gated
cross-attention blocks inserted before some of its decoder layers (Flamingo, Alayrac et al. 2022; CALM,
Bansal et al. 2024, arXiv:2401.02412).

How fusion reads the source, in order (``fusion_forward``):

1. **What the source reads** (``processing.py``): the same text through its own tokenizer. With
   ``memory="prompt"`` it reads the prompt once; decoding then costs the target plus cross-attention to
   cached keys/values. With ``memory="sequence"`` it reads along, one step per new token.
2. **The source runs** frozen and in eval mode; the layers it is read at are ``source_layers``
   (hidden_states indices; one for all blocks, or one per block as CALM maps layers to layers).
3. **Each block** (the shared ``EnhancedCrossAttentionLayer``: queries from the target's stream, keys and
   values projected from the source's width, an adapter, a tanh gate at 0) projects its source layer to
   keys/values once per source token; decoding appends them to ``FusionCache.blocks``.
4. **The causal law**: target token i reads only the source's view of the text up to where token i ends
   (``processing.cross_attention_from_counts``); a token that may read nothing gets no update at all.
5. **The target runs** as itself: a forward pre-hook on each chosen decoder layer adds its block's gated
   update to the hidden states entering that layer (the target's modules are untouched, so its own
   masks, caches, position handling and any PEFT adapters keep working). With every gate at 0 the
   composed model computes exactly the target alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from ..errors import LLMModulesError
from .deferral import DeferralState, deferred_forward
from .fusion_blocks import Fusion, FusionContext, decoder_layers, default_fusion_layers
from .fusion_reading import (
    FusionCache,
    decode_source_step,
    run_source,
    source_read_layers,
    source_side,
    source_view_rows,
    start_decoding,
)
from .heads import MIXTURE_HEADS, HeadInputs, TargetHead
from .loading import config_from_dict, load_target_lm, tokenizer_of
from .processing import CompositionProcessor, cross_attention_from_counts, describe_differences, same_tokenizer, vocabulary_differences
from .source import read_source
from .topology import ComposeParts, Topology, TopologyOutput

__all__ = ["Fusion", "FusionCache", "FusionTopology", "decoder_layers", "default_fusion_layers", "fusion_forward",
           "run_source", "source_side", "source_view_rows"]


@dataclass
class FusionPass:
    """One fusion forward up to the head: the target's logits [B, t, V]; for mixture heads its last hidden states
    at every new position [B, T, d_t] and the source's last-layer states aligned with them [B, T, d_s] (else None)."""

    logits: torch.Tensor
    hidden: torch.Tensor | None
    source_states: torch.Tensor | None
    cache: FusionCache | None


def fusion_forward(model, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None, position_ids,
                   cache: FusionCache | None, use_cache: bool, logits_to_keep: int, inputs: dict) -> FusionPass:
    """One forward of a fusion model up to the head.

    ``inputs``: the source_* tensors (and ``source_states`` [B, S, L, d_s] from the source-state cache).
    """
    fusion: Fusion = model.fusion
    batch, length = input_ids.shape
    past = cache.get_seq_length() if cache is not None else 0
    wants_states = model.config.head in MIXTURE_HEADS
    layers = source_read_layers(model)
    if use_cache and cache is None:
        cache = FusionCache(target=DynamicCache(config=model.target.config),
                            source=DynamicCache(config=model.source.config)
                            if model.config.memory == "sequence" and model.source is not None else None)
    if past == 0:
        side = source_side(model, input_ids, attention_mask, inputs)
        if inputs.get("source_states") is not None:
            cached = inputs["source_states"]  # [B, S, L, d_s], L = read layers (+ last)
            states = [cached[:, :, i] for i in range(cached.shape[2])]
        else:
            states = run_source(model.source, side, cache, layers)
        columns = torch.arange(length, device=input_ids.device)
        allowed = cross_attention_from_counts(side.attention_mask, side.groups, side.counts, columns, model.config.leaky)
        if cache is not None:
            start_decoding(model, cache, side, input_ids, attention_mask)
    else:
        if length != 1 and model.config.memory == "sequence":
            raise LLMModulesError("a fusion model with memory='sequence' decodes one token per step after the prompt")
        states = decode_source_step(model, cache, input_ids, layers) if model.config.memory == "sequence" else None
        allowed = cache.slot_valid.bool()[:, None, :].expand(-1, length, -1)
    keys, values = fusion.project(states[: len(fusion.read_layers)]) if states is not None else ([], [])
    if cache is not None:
        if states is not None:
            pairs = [cache.blocks.append(b, k, v) for b, (k, v) in enumerate(zip(keys, values))]
            keys, values = [k for k, _ in pairs], [v for _, v in pairs]
        else:
            keys, values = cache.blocks.keys, cache.blocks.values
    last_states = states[layers.index(-1)] if wants_states and states is not None else None
    if cache is not None and wants_states:
        cache.states = last_states if cache.states is None else torch.cat([cache.states, last_states], 1)
    reads_any = allowed.any(-1, keepdim=True)
    fusion.context = FusionContext(keys, values, allowed | ~reads_any, reads_any)
    try:
        output = model.target(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache.target if cache is not None else None,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            output_hidden_states=wants_states,
        )
    finally:
        # Activation checkpointing re-runs the hooks during backward, so it keeps the context until the next
        # forward; otherwise it goes now, and the target called on its own is the target alone again.
        if not (getattr(model.target, "is_activation_checkpointing", False) and torch.is_grad_enabled()):
            fusion.context = None
    hidden = output.hidden_states[-1] if wants_states else None  # all new positions (pointer keys need them)
    return FusionPass(output.logits, hidden, last_states, cache)


class FusionTopology(Topology):
    """The target keeps its tokenizer, embeddings and head; blocks before some of its layers read the source."""

    name = "fusion"
    new_module_prefixes = ("fusion.", "head.")
    mixture_prefix = "head.mixture."

    def compose_parts(self, source: Any, target: Any, tokenizer: Any, source_tokenizer: Any,
                      source_config: PreTrainedConfig, target_init: str, options: dict[str, Any]) -> ComposeParts:
        source_tok = tokenizer_of(source_tokenizer, source, "source")  # the source reads with its own tokenizer
        target_tok = tokenizer_of(tokenizer, target, "target")
        body = load_target_lm(target, target_init)
        text = body.config.get_text_config()
        options.setdefault("gate", "tanh")
        options.setdefault("head", "target")
        options.setdefault("heads", int(text.num_attention_heads))
        shared = source_tok is None or same_tokenizer(target_tok, source_tok)
        source_tok = target_tok if source_tok is None else source_tok
        vocab = int(text.vocab_size)
        if options.get("head") in MIXTURE_HEADS:
            check_one_vocabulary(options["head"], target_tok, source_tok, vocab,
                                 int(source_config.get_text_config().vocab_size))
            shared = True  # one vocabulary: the source reads the target's ids (processing.py: shared)
        return ComposeParts(body, target_tok, source_tok, vocab, shared)

    def random_target(self, target_config: PreTrainedConfig) -> PreTrainedModel:
        return load_target_lm(target_config, "random")

    def saved_target(self, config, target: Any, folder: Path) -> PreTrainedModel:
        if config.train_target == "all":  # every target weight is saved: its config rebuilds it
            if target is not None:
                return load_target_lm(target, "pretrained")
            return self.random_target(config_from_dict(config.target_config))
        reference = target if target is not None else config.target_name_or_path
        if reference is None:
            raise LLMModulesError(f"{folder}/config.json names no target; pass target=... to from_pretrained")
        return load_target_lm(reference, "pretrained")

    def build(self, model: nn.Module, config, d_source: int, d_target: int, target: PreTrainedModel) -> None:
        layers = config.fusion_layers
        if layers is None:
            layers = default_fusion_layers(int(target.config.get_text_config().num_hidden_layers), config.fusion_every)
        model.fusion = Fusion(d_source, d_target, layers, config.source_layers or [-1], config.heads,
                              config.adapter_dim, config.gate, config.attention_dropout)
        model.head = self.mixture_head(None, config, d_target, d_source, fallback=TargetHead())

    def attach(self, model: nn.Module) -> None:
        if model.config.train_target == "lora":
            add_lora(model.target, model.config)
        model.fusion.attach(model.target)
        model.processor = CompositionProcessor(model.tokenizer, model.source_tokenizer, model.config.memory,
                                               shared=model.config.shared_tokenizer)

    def freeze(self, model: nn.Module) -> None:
        choice = model.config.train_target
        if choice == "none":
            model.target.requires_grad_(False)
        elif choice == "lora":
            for name, parameter in model.target.named_parameters():
                parameter.requires_grad_("lora_" in name)

    def keep_frozen_in_eval(self, model: nn.Module) -> None:
        if model.config.train_target == "none":
            model.target.eval()  # frozen as in CALM: the composed model is the target plus the blocks' updates

    def input_embeddings(self, model: nn.Module) -> nn.Module | None:
        return model.target.get_input_embeddings()

    def output_embeddings(self, model: nn.Module) -> nn.Module | None:
        return model.target.get_output_embeddings()

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.fusion.blocks

    def new_modules(self, model: nn.Module) -> nn.Module:
        return model.fusion

    def source_states(self, model, input_ids, attention_mask, position_ids, cache, layers) -> torch.Tensor:
        return torch.stack(read_source(model.source, input_ids, attention_mask, position_ids,
                                       layers or source_read_layers(model), cache), dim=2)

    def forward(self, model, input_ids, attention_mask, position_ids, cache, use_cache, logits_to_keep,
                output_attentions, inputs) -> TopologyOutput:
        threshold = None if model.training else model.config.defer_threshold
        if threshold is not None and use_cache:  # deferral decoding: the source runs only where the gate asks
            if cache is None:
                cache = FusionCache(target=DynamicCache(config=model.target.config),
                                    deferral=DeferralState(DynamicCache(config=model.source.config)))
            model.last_deferral = cache.deferral
            return TopologyOutput(deferred_forward(model, input_ids, attention_mask, position_ids, cache,
                                                   logits_to_keep), None, cache)
        run = fusion_forward(model, input_ids, attention_mask, position_ids, cache, use_cache, logits_to_keep, inputs)
        hidden = run.hidden
        if hidden is not None and logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        head = model.head(HeadInputs(hidden, run.hidden, run.logits, run.source_states, attention_mask, run.cache,
                                     model.source_logits, threshold))
        return TopologyOutput(head.logits, head.head_logits, run.cache, source_weight=head.source_weight,
                              call_gate_loss=head.call_gate_loss)

    def before_generate(self, model: nn.Module, input_ids: torch.LongTensor | None, kwargs: dict[str, Any]) -> None:
        # without a cache each step recomputes the whole sequence: a fixed prompt memory must be given up front
        if (input_ids is not None and kwargs.get("source_counts") is None and model.config.memory == "prompt"
                and not kwargs.get("use_cache", True)):
            kwargs.update(model.processor.align_ids(input_ids, kwargs.get("attention_mask")))

    def step_inputs(self, model: nn.Module, cache: Any, source_inputs: dict[str, Any]) -> dict[str, Any]:
        started = cache is not None and cache.get_seq_length() > 0
        uncached_sequence = cache is None and model.config.memory == "sequence"
        if started or uncached_sequence:
            return {}
        # the first step, or recomputing with a fixed prompt memory
        return {k: v for k, v in source_inputs.items() if v is not None}

    def after_step(self, model: nn.Module, model_kwargs: dict[str, Any]) -> None:
        counts = model_kwargs.get("source_counts")
        if counts is not None and model.config.memory == "prompt":
            # recomputing with prompt memory: each new token reads the whole prompt
            whole = model_kwargs["source_attention_mask"].sum(-1, keepdim=True).to(counts.dtype)
            model_kwargs["source_counts"] = torch.cat([counts, whole], dim=1)

    def check_saveable(self, model: nn.Module) -> None:
        if model.config.train_target != "all" and not model.config.target_name_or_path:
            raise LLMModulesError("the fusion target was given as an in-memory model; save it with "
                                  "target.save_pretrained(DIR) and compose from DIR, so the saved model can reference it")

    def save_extra(self, model: nn.Module, folder: Path) -> None:
        if not model.config.shared_tokenizer:
            model.source_tokenizer.save_pretrained(folder / SOURCE_TOKENIZER_FOLDER)

    def describe(self, config) -> str:
        return (f"fusion (the target keeps its tokenizer and head; memory `{config.memory}`, target weights trained: "
                f"`{config.train_target}`); gated cross-attention blocks before target layers "
                f"{config.fusion_layers or f'every {config.fusion_every}'}, reading source layers "
                f"{config.source_layers or [-1]}, {config.heads} heads,")


SOURCE_TOKENIZER_FOLDER = "source_tokenizer"


def check_one_vocabulary(head: str, target_tok: PreTrainedTokenizerBase, source_tok: PreTrainedTokenizerBase,
                         target_rows: int, source_rows: int) -> None:
    """A mixture head mixes the source's next-token distribution into the target's: every id both output heads can
    produce must name the same token (``vocabulary_differences``). How each tokenizer splits text does not matter:
    the source reads the target's ids as they are."""
    differences = vocabulary_differences(target_tok, source_tok, target_rows, source_rows)
    if differences:
        raise LLMModulesError(
            f"head={head!r} mixes in the source's next-token distribution, which needs one vocabulary over the ids "
            f"both heads produce ({target_rows} target, {source_rows} source rows); these tokenizers differ (the first "
            f"differing ids: {describe_differences(differences, 'target', 'source')}). Use head='target', or a source "
            "and target built on one tokenizer")


def add_lora(target: PreTrainedModel, config) -> None:
    """LoRA adapters in the target's linear layers, through PEFT (injected in place: the target stays itself)."""
    from peft import LoraConfig, inject_adapter_in_model

    modules = config.lora_target_modules
    if modules is None:  # PEFT's per-architecture defaults (attention projections)
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults

        modules = defaults.get(target.config.model_type)
        if modules is None:
            raise LLMModulesError(f"no default LoRA modules for a {target.config.model_type} target; "
                                  "set lora_target_modules (e.g. ['q_proj', 'v_proj'])")
    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=list(modules))
    inject_adapter_in_model(lora, target)
