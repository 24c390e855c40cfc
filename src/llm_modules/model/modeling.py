"""``LLMModulesForCausalLM``: a frozen source model read by a small target, as one HF model.

Two topologies, each in its own module:

- ``bridge.py``: the paper's released architecture. The source's states pass through Enhanced
  Cross-Attention into the target's ``inputs_embeds``; a head predicts source tokens.
- ``fusion.py``: the target keeps its tokenizer, embeddings and head; gated cross-attention blocks
  inserted before some of its layers read the source (Flamingo/CALM); ``processing.py`` aligns two tokenizers.

This module composes the parts, runs the head (``heads.py``), computes the loss, plugs into
``generate()`` and saves/loads (trainable weights only; source and frozen target are referenced).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationConfig,
    GenerationMixin,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..errors import LLMModulesError
from .bridge import BridgeCache, bridge_forward
from .configuration import ComposeOptions, LLMModulesConfig
from .connector import EnhancedCrossAttention
from .fusion import Fusion, FusionCache, decoder_layers, default_fusion_layers, fusion_forward
from .heads import MIXTURE_HEADS, SourceMixture
from .loading import (
    ModelLike,
    check_safetensors,
    config_from_dict,
    load_causal_lm,
    load_config,
    load_target_body,
    load_target_lm,
    load_tokenizer,
    resolve_dtype,
)
from .loss import composed_lm_loss
from .masks import positions_from_padding
from .processing import CompositionProcessor, describe_differences, same_tokenizer, vocabulary_differences
from .source import read_source

WEIGHTS_NAME = "model.safetensors"
SOURCE_TOKENIZER_FOLDER = "source_tokenizer"
# Families whose learned absolute position table is a hard length limit.
ABSOLUTE_POSITION_TYPES = ("gpt2", "gpt_neo", "opt")
SOURCE_INPUTS = ("source_input_ids", "source_attention_mask", "source_position_ids", "source_groups", "source_counts")


@dataclass
class ComposedCausalLMOutput(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` plus ``head_logits`` [B, T, V]: with a mixture head (source_mix, source_pointer)
    in training mode, the base head's own logits. Training adds their cross-entropy to the mixture's, so that the
    base head learns every token whatever the gate does (in training mode ``loss`` already includes it when
    ``labels`` are given; in evaluation mode ``loss`` is the mixture's alone)."""

    head_logits: torch.FloatTensor | None = None


def _check_one_vocabulary(head: str, target_tok, source_tok, target_rows: int, source_rows: int) -> None:
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


def _hidden_size(config: PreTrainedConfig) -> int:
    return int(config.get_text_config().hidden_size)


class LLMModulesForCausalLM(PreTrainedModel, GenerationMixin):
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
        fusion = config.topology == "fusion"
        if target is None:
            if not config.target_config:
                raise LLMModulesError("LLMModulesConfig has no target_config; build the model with compose()")
            target_config = config_from_dict(config.target_config)
            target = load_target_lm(target_config, "random") if fusion else load_target_body(target_config, "random")
        source_config = source.config if source is not None else None
        if source_config is None:
            if not config.source_config:
                raise LLMModulesError("LLMModulesConfig has no source_config; build the model with compose()")
            source_config = config_from_dict(config.source_config)
        d_source, d_target = _hidden_size(source_config), _hidden_size(target.config)
        self.source_vocab_size = int(source_config.get_text_config().vocab_size)  # rows the source can embed
        if fusion:
            layers = config.fusion_layers
            if layers is None:
                layers = default_fusion_layers(int(target.config.get_text_config().num_hidden_layers), config.fusion_every)
            self.fusion = Fusion(d_source, d_target, layers, config.source_layers or [-1], config.heads,
                                 config.adapter_dim, config.gate, config.attention_dropout)
        else:
            self.connector = EnhancedCrossAttention(
                d_source, d_target, layers=config.connector_layers, heads=config.heads,
                adapter_dim=config.adapter_dim, intermediate_dim=config.intermediate_dim, gate=config.gate,
                attention_dropout=config.attention_dropout,
            )
            if config.head == "source":
                self.head_projection = nn.Linear(d_target, d_source, bias=False)
            else:
                self.lm_head = nn.Linear(d_target, config.vocab_size, bias=False)
        if config.head in MIXTURE_HEADS:
            if config.source_layer != -1:
                raise LLMModulesError(f"head={config.head!r} reads the source's last layer; use source_layer=-1")
            self.mixture = SourceMixture(d_target, d_source, pointer=config.head == "source_pointer",
                                         confidence=config.mixture_gate == "confidence")
        self.post_init()
        # Attached after post_init so that HF weight initialisation never touches pretrained weights.
        self.target = target
        self.source = source
        self.tokenizer = tokenizer
        self.source_tokenizer = source_tokenizer if source_tokenizer is not None else tokenizer
        if fusion:
            if config.train_target == "lora":
                _add_lora(target, config)
            self.fusion.attach(target)
            self.processor = CompositionProcessor(tokenizer, self.source_tokenizer, config.memory,
                                                  shared=config.shared_tokenizer)
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
        options = ComposeOptions.from_mapping({**options, "target_init": target_init}).to_kwargs()
        target_init = options.pop("target_init")
        if source is None and source_config is None:
            raise LLMModulesError("give a source model, or source_config=... to train from cached source states")
        fusion = options.get("topology", "bridge") == "fusion"
        source_model = None if source is None else load_causal_lm("source", source, source_revision, source_dtype)
        source_config = source_model.config if source_model is not None else load_config("source", source_config)
        source_tok = None  # fusion only: the source reads with its own tokenizer
        if fusion:
            source_tok = _tokenizer_of(source_tokenizer, source, "source")
            target_tok = _tokenizer_of(tokenizer, target, "target")
            body = load_target_lm(target, target_init)
            options.setdefault("gate", "tanh")
            options.setdefault("head", "target")
            options.setdefault("heads", int(body.config.get_text_config().num_attention_heads))
            shared = source_tok is None or same_tokenizer(target_tok, source_tok)
            source_tok = target_tok if source_tok is None else source_tok
            vocab = int(body.config.get_text_config().vocab_size)
            if options.get("head") in MIXTURE_HEADS:
                _check_one_vocabulary(options["head"], target_tok, source_tok, vocab,
                                      int(source_config.get_text_config().vocab_size))
                shared = True  # one vocabulary: the source reads the target's ids (processor.py: shared)
            tokenizer_for_ids = target_tok
        else:
            target_tok = _tokenizer_of(tokenizer, None, "source") or _tokenizer_of(source_tokenizer, source, "source")
            if target_tok is None:
                raise LLMModulesError("without a source model, pass the source's tokenizer=...")
            body = load_target_body(target, target_init)
            shared = True
            vocab = max(int(source_config.get_text_config().vocab_size), len(target_tok))
            tokenizer_for_ids = target_tok
        config = LLMModulesConfig(
            source_name_or_path=_name_of(source, source_model),
            source_revision=source_revision,
            source_config=source_config.to_dict(),
            source_dtype=source_dtype,
            target_name_or_path=_name_of(target, None),
            target_config=body.config.to_dict(),
            target_init=target_init,
            vocab_size=vocab,
            shared_tokenizer=shared,
            pad_token_id=tokenizer_for_ids.pad_token_id,
            eos_token_id=tokenizer_for_ids.eos_token_id,
            bos_token_id=tokenizer_for_ids.bos_token_id,
            **options,
        )
        model = cls(config, source=source_model, target=body, tokenizer=tokenizer_for_ids,
                    source_tokenizer=source_tok)
        pad = tokenizer_for_ids.pad_token_id
        model.generation_config = GenerationConfig(
            pad_token_id=pad if pad is not None else tokenizer_for_ids.eos_token_id,
            eos_token_id=tokenizer_for_ids.eos_token_id,
            bos_token_id=tokenizer_for_ids.bos_token_id,
        )
        return model

    def _freeze(self) -> None:
        if self.source is not None:
            self.source.eval()
            self.source.requires_grad_(False)
        if self.config.topology == "fusion":
            choice = self.config.train_target
            if choice == "none":
                self.target.requires_grad_(False)
            elif choice == "lora":
                for name, parameter in self.target.named_parameters():
                    parameter.requires_grad_("lora_" in name)
        else:
            # The bridge feeds the target through inputs_embeds: its token embeddings are never read.
            embeddings = self.target.get_input_embeddings()
            if embeddings is not None:
                embeddings.requires_grad_(False)
        # Frozen weights are never saved; Trainer reads this set to know their absence is expected.
        self._keys_to_ignore_on_save = set(self.state_dict()) - set(self.trainable_state_dict())

    def train(self, mode: bool = True) -> LLMModulesForCausalLM:
        super().train(mode)
        if self.source is not None:
            self.source.eval()  # frozen: no dropout, ever
        if self.config.topology == "fusion" and self.config.train_target == "none":
            self.target.eval()  # frozen as in CALM: the composed model is the target plus the blocks' updates
        return self

    def _init_weights(self, module: nn.Module) -> None:
        """Keep PyTorch's default initialisation (as the release); tanh gates start at 0 in their constructor."""

    def get_input_embeddings(self) -> nn.Module | None:
        if self.config.topology == "fusion":
            return self.target.get_input_embeddings()
        return None if self.source is None else self.source.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module | None:
        if self.config.topology == "fusion":
            return self.target.get_output_embeddings()
        return getattr(self, "lm_head", None)

    @property
    def blocks(self) -> nn.ModuleList:
        """The cross-attention layers: the bridge's connector stack or the fusion blocks."""
        return self.fusion.blocks if self.config.topology == "fusion" else self.connector.layers

    def trainable_parameter_groups(self, mixture: bool = False) -> dict[str, list[nn.Parameter]]:
        """Named optimizer groups: ``connector`` (the new cross-attention modules) and ``target`` (the target's
        weights that train; for the bridge also its new head and mixture gate, as the paper's graph trains them).
        ``mixture=True``: a fusion model's mixture gate is a third group, ``mixture``, with its own learning rate."""
        fusion = self.config.topology == "fusion"
        new_modules = ("connector.", "fusion.", "mixture.") if fusion else ("connector.",)
        groups: dict[str, list[nn.Parameter]] = {"connector": [], "target": [], **({"mixture": []} if mixture else {})}
        for name, parameter in self.named_parameters():
            if parameter.requires_grad:
                group = "connector" if name.startswith(new_modules) else "target"
                if mixture and fusion and name.startswith("mixture."):
                    group = "mixture"
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
    def source_states(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        layers: tuple[int, ...] | None = None,
    ) -> torch.Tensor:
        """Frozen source states the model reads: [B, T] source ids -> [B, T, d_s] for the bridge (its
        ``source_layer``), [B, T, L, d_s] for fusion (its read layers, + the last one for mixture heads).
        This is what the source-state cache stores."""
        if self.source is None:
            raise LLMModulesError(
                "this model was built without its source (cache-only); pass source_states=..., "
                "or reload it with the source (from_pretrained(dir) loads config.source_name_or_path)"
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if position_ids is None:
            position_ids = positions_from_padding(attention_mask)[:, -input_ids.shape[1]:]
        if self.config.topology == "bridge":
            return read_source(self.source, input_ids, attention_mask, position_ids, (self.config.source_layer,), cache)[0]
        return torch.stack(read_source(self.source, input_ids, attention_mask, position_ids,
                                       layers or self.source_read_layers, cache), dim=2)

    @property
    def source_read_layers(self) -> tuple[int, ...]:
        """Fusion: the source layers its blocks read, plus the last one when a mixture head needs it."""
        layers = self.fusion.read_layers
        if self.config.head in MIXTURE_HEADS and -1 not in layers:
            layers = (*layers, -1)
        return layers

    def _check_length(self, positions: torch.Tensor) -> None:
        target_config = self.target.config
        if target_config.model_type in ABSOLUTE_POSITION_TYPES and positions.numel():
            limit = int(target_config.max_position_embeddings)
            longest = int(positions.max()) + 1
            if longest > limit:
                raise LLMModulesError(
                    f"sequence of {longest} tokens exceeds the target's max_position_embeddings={limit} "
                    f"({target_config.model_type} has learned absolute positions); filter or truncate the data"
                )

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        source_states: torch.Tensor | None = None,
        cache: BridgeCache | FusionCache | None = None,
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
        With ``cache`` only the new positions are given and ``attention_mask`` covers past + new.
        ``logits_to_keep=k`` computes the head on the last k positions only (decoding).
        """
        fusion = self.config.topology == "fusion"
        if input_ids is None and (fusion or source_states is None):
            raise LLMModulesError("forward needs input_ids" + ("" if fusion else " or source_states"))
        reference = input_ids if input_ids is not None else source_states
        batch, length = reference.shape[:2]
        use_cache = bool(use_cache) and not self.config.leaky
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(batch, past + length, dtype=torch.long, device=reference.device)
        if attention_mask.shape[1] != past + length:
            raise LLMModulesError(
                f"attention_mask covers {attention_mask.shape[1]} positions but past + new = {past} + {length}"
            )
        position_ids = positions_from_padding(attention_mask)[:, past:]
        self._check_length(position_ids)
        head_logits = attention_maps = None
        if fusion:
            inputs = dict(source_input_ids=source_input_ids, source_attention_mask=source_attention_mask,
                          source_position_ids=source_position_ids, source_groups=source_groups,
                          source_counts=source_counts, source_states=source_states)
            logits, hidden, here, cache = fusion_forward(self, input_ids, attention_mask, position_ids, cache,
                                                         use_cache, logits_to_keep, inputs)
            if self.config.head in MIXTURE_HEADS:
                logits, head_logits = self._mix(hidden, logits, here, attention_mask, cache, logits_to_keep)
        else:
            hidden, states, attention_maps, cache = bridge_forward(self, input_ids, attention_mask, position_ids,
                                                                   source_states, cache, use_cache, output_attentions)
            full_hidden = hidden
            if logits_to_keep:
                hidden = hidden[:, -logits_to_keep:]
            logits, head_logits = self._bridge_head(hidden, full_hidden, states, attention_mask, cache)
        loss = None
        if labels is not None:
            # evaluation reports the mixture's loss alone
            loss = composed_lm_loss(logits, head_logits if self.training else None, labels)
        return ComposedCausalLMOutput(
            loss=loss,
            logits=logits,
            head_logits=head_logits if self.training else None,
            cache=cache if use_cache else None,
            attentions=tuple(attention_maps) if output_attentions and attention_maps else None,
        )

    def _bridge_head(self, hidden, full_hidden, states, attention_mask, cache) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Bridge logits over the source vocabulary: hidden [B, t, d_t] -> ([B, t, V], base logits for mixtures)."""
        hidden = hidden.to(self.connector.pre_proj.weight.dtype)
        if self.config.head == "new":
            return self._readable(self.lm_head(hidden)), None
        if self.config.head == "source":
            return self._source_head(self.head_projection(hidden)), None
        base = self._readable(self.lm_head(hidden).float())
        return self._mix_paths(hidden, full_hidden, base, states, attention_mask, cache), base

    def _readable(self, logits: torch.Tensor) -> torch.Tensor:
        """The bridge's head is sized by the tokenizer, which can hold more entries than the source embeds
        (a reloaded Qwen2 tokenizer adds <|endoftext|>); the bridge feeds its tokens back to the source, so ids
        the source cannot read get -inf and are never sampled (without this, sampling one crashed the source)."""
        readable = self.source_vocab_size
        if logits.shape[-1] <= readable:
            return logits
        return logits.index_fill(-1, torch.arange(readable, logits.shape[-1], device=logits.device),
                                 torch.finfo(logits.dtype).min)

    def _mix(self, hidden, logits, here, attention_mask, cache, logits_to_keep) -> tuple[torch.Tensor, torch.Tensor]:
        """Fusion with a mixture head: the target's own logits are the base path."""
        full_hidden = hidden
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return self._mix_paths(hidden, full_hidden, logits.float(), here, attention_mask, cache), logits.float()

    def _mix_paths(self, hidden, full_hidden, base, states, attention_mask, cache) -> torch.Tensor:
        """hidden [B, t, d_t] (positions with logits), full_hidden [B, T, d_t] (new positions), base [B, t, V],
        states [B, T, d_s] the source at each new position."""
        pointer = None
        if self.config.head == "source_pointer":
            # keys are projected once per position and cached projected: a decode step projects only its own
            keys = self.mixture.pointer_keys(full_hidden, states[:, -full_hidden.shape[1]:])
            all_states = states
            if cache is not None:
                keys, all_states = cache.extend_pointer(keys, states)
            pointer = (keys, all_states, attention_mask)
        return self.mixture(hidden, base, self._source_head, states[:, -hidden.shape[1]:], pointer)

    def _source_head(self, states: torch.Tensor) -> torch.Tensor:  # [B, T, d_s] -> [B, T, V] fp32
        if self.source is None:
            raise LLMModulesError(f"head={self.config.head!r} needs the source's output head; load the source")
        head = self.source.get_output_embeddings()
        logits = head(states.to(head.weight.dtype)).float()
        missing = self.config.vocab_size - logits.shape[-1]
        if missing > 0:  # tokenizer entries beyond the source's vocabulary: the source never predicts them
            logits = F.pad(logits, (0, missing), value=torch.finfo(logits.dtype).min)
        return logits[..., : self.config.vocab_size]

    # ------------------------------------------------------------------------------------ generation
    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # Our cache is a BridgeCache/FusionCache that forward() creates; generate() must not make a DynamicCache.
        return False

    @torch.no_grad()
    def generate(self, input_ids: torch.LongTensor | None = None, **kwargs):
        """``GenerationMixin.generate``; a fusion model given the target's ids alone derives what the source reads."""
        if (self.config.topology == "fusion" and input_ids is not None and kwargs.get("source_counts") is None
                and self.config.memory == "prompt" and not kwargs.get("use_cache", True)):
            kwargs.update(self.processor.align_ids(input_ids, kwargs.get("attention_mask")))
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
        if self.config.topology == "fusion":
            started = cache is not None and cache.get_seq_length() > 0
            uncached_sequence = cache is None and self.config.memory == "sequence"
            if not started and not uncached_sequence:  # the first step, or recomputing with a fixed prompt memory
                inputs.update({k: v for k, v in source_inputs.items() if v is not None})
        return inputs

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, *args, **kwargs):
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        counts = model_kwargs.get("source_counts")
        if self.config.topology == "fusion" and counts is not None and self.config.memory == "prompt":
            # recomputing with prompt memory: each new token reads the whole prompt
            whole = model_kwargs["source_attention_mask"].sum(-1, keepdim=True).to(counts.dtype)
            model_kwargs["source_counts"] = torch.cat([counts, whole], dim=1)
        return model_kwargs

    # ------------------------------------------------------------------------------------- save/load
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        state_dict: dict[str, torch.Tensor] | None = None,
        **kwargs,
    ) -> None:
        """Write config, trainable weights (safetensors), tokenizer(s), generation config and a model card.

        The source (and a fusion model's frozen target) is referenced by name or path, never copied.
        """
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        if not self.config.source_name_or_path:
            raise LLMModulesError(
                "the source was given as an in-memory model without a folder or hub id; save it with "
                "source.save_pretrained(DIR) and compose from DIR, so the saved model can reference it"
            )
        if self.config.topology == "fusion" and self.config.train_target != "all" and not self.config.target_name_or_path:
            raise LLMModulesError("the fusion target was given as an in-memory model; save it with "
                                  "target.save_pretrained(DIR) and compose from DIR, so the saved model can reference it")
        keep = set(self.trainable_state_dict())
        tensors = state_dict if state_dict is not None else self.state_dict()
        weights = {name: t.detach().contiguous().cpu() for name, t in tensors.items() if name in keep}
        self.config.architectures = [type(self).__name__]
        self.config.save_pretrained(folder)
        save_file(weights, folder / WEIGHTS_NAME, metadata={"format": "pt"})
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(folder)
        if self.config.topology == "fusion" and not self.config.shared_tokenizer:
            self.source_tokenizer.save_pretrained(folder / SOURCE_TOKENIZER_FOLDER)
        self.generation_config.save_pretrained(folder)
        (folder / "README.md").write_text(model_card(self.config, sum(t.numel() for t in weights.values())))

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
        folder = _local_folder(pretrained_model_name_or_path, kwargs.get("revision"))
        if not isinstance(config, LLMModulesConfig):
            config = LLMModulesConfig.from_pretrained(folder)
        weights_file = folder / WEIGHTS_NAME
        if not weights_file.exists():
            raise LLMModulesError(f"{folder} holds no {WEIGHTS_NAME}; is it a folder written by save_pretrained()?")
        tokenizer = load_tokenizer(str(folder), "saved model")
        source_tokenizer = None
        if (folder / SOURCE_TOKENIZER_FOLDER).is_dir():
            source_tokenizer = load_tokenizer(str(folder / SOURCE_TOKENIZER_FOLDER), "saved model's source")
        source_model = None
        if load_source:
            source_ref = source if source is not None else config.source_name_or_path
            if source_ref is None:
                raise LLMModulesError(f"{folder}/config.json names no source; pass source=... to from_pretrained")
            source_model = load_causal_lm("source", source_ref, config.source_revision, config.source_dtype)
        target_config = config_from_dict(config.target_config)
        if config.topology == "fusion":
            if config.train_target == "all":
                body = load_target_lm(target if target is not None else target_config,
                                      "pretrained" if target is not None else "random")
            else:
                reference = target if target is not None else config.target_name_or_path
                if reference is None:
                    raise LLMModulesError(f"{folder}/config.json names no target; pass target=... to from_pretrained")
                body = load_target_lm(reference, "pretrained")
        else:
            body = load_target_body(target_config, "random")
        model = cls(config, source=source_model, target=body, tokenizer=tokenizer, source_tokenizer=source_tokenizer)
        check_safetensors(weights_file)  # a damaged or truncated file is named, never half-loaded
        state = load_file(weights_file)
        expected = set(model.trainable_state_dict())
        missing = sorted(expected - set(state))
        unexpected = sorted(set(state) - expected)
        if missing or unexpected:
            raise LLMModulesError(
                f"{weights_file} does not match the model its config describes "
                f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''})"
            )
        model.load_state_dict(state, strict=False)
        generation_file = folder / "generation_config.json"
        if generation_file.exists():
            model.generation_config = GenerationConfig.from_pretrained(folder)
        dtype = kwargs.get("dtype") or kwargs.get("torch_dtype")
        if dtype not in (None, "auto"):
            (model.fusion if config.topology == "fusion" else model.connector).to(resolve_dtype(dtype))
        return model.eval()


def _add_lora(target: PreTrainedModel, config: LLMModulesConfig) -> None:
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


def _tokenizer_of(given, model_ref, role: str) -> PreTrainedTokenizerBase | None:
    """A tokenizer given as an object or path, else the one saved beside ``model_ref`` (None if neither)."""
    if isinstance(given, PreTrainedTokenizerBase):
        return given
    if isinstance(given, (str, os.PathLike)):
        return load_tokenizer(str(given), role)
    if model_ref is None or isinstance(model_ref, PreTrainedConfig):
        return None
    return load_tokenizer(model_ref, role)

def _name_of(given: object, model: PreTrainedModel | None) -> str | None:
    if isinstance(given, (str, os.PathLike)):
        text = str(given)
        return str(Path(text).resolve()) if Path(text).exists() else text
    candidate = model.name_or_path if model is not None else getattr(given, "name_or_path", None)
    if candidate and Path(candidate).exists():
        return str(Path(candidate).resolve())
    return candidate or None


def _local_folder(name: str | os.PathLike, revision: str | None) -> Path:
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(name).startswith((".", "/", "~")):
        raise LLMModulesError(f"{name} is not a folder written by save_pretrained()")
    try:  # a hub repository holding a saved composed model
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(name), revision=revision))
    except Exception as error:
        raise LLMModulesError(
            f"could not find the composed model {name!r}: no such folder, and the hub download failed ({error})"
        ) from error


def _topology_line(config: LLMModulesConfig) -> str:
    if config.topology == "fusion":
        return (f"fusion (the target keeps its tokenizer and head; memory `{config.memory}`, target weights trained: "
                f"`{config.train_target}`); gated cross-attention blocks before target layers "
                f"{config.fusion_layers or f'every {config.fusion_every}'}, reading source layers {config.source_layers or [-1]}, "
                f"{config.heads} heads,")
    return (f"bridge; connector: {config.connector_layers} Enhanced Cross-Attention layers, {config.heads} heads,")


def model_card(config: LLMModulesConfig, saved_parameters: int) -> str:
    """A short model card naming both base models and how to load the result."""
    target = config.target_name_or_path or f"a {config.target_config.get('model_type')} config"
    return f"""---
library_name: transformers
tags: [llm-modules, knowledge-transfer, cross-attention]
base_model: [{json.dumps(config.source_name_or_path)}]
---
# LLM Modules composition

- **Source (frozen, referenced, not stored here):** `{config.source_name_or_path}` (revision `{config.source_revision}`)
- **Target:** `{target}` (init: `{config.target_init}`)
- **Topology:** {_topology_line(config)}
  adapter {config.adapter_dim}, gate `{config.gate}`, head `{config.head}`, causal mask: {not config.leaky}
- **Saved trainable parameters:** {saved_parameters:,}

```python
import llm_modules  # registers the architecture with the Auto classes
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER")  # loads the source from its reference
```
Methods: Kolomeitsev, *LLM Modules: Knowledge Transfer from a Large to a Small Model using Enhanced
Cross-Attention*, arXiv:2502.08213 (2025); fusion after Flamingo (arXiv:2204.14198) and CALM
(arXiv:2401.02412). {"This model uses the released padding-only (leaky) mask: its teacher-forced loss is not a next-token loss." if config.leaky else ""}
"""


AutoConfig.register(LLMModulesConfig.model_type, LLMModulesConfig)
AutoModelForCausalLM.register(LLMModulesConfig, LLMModulesForCausalLM)
