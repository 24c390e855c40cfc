"""``LLMModulesForCausalLM``: a frozen source, Enhanced Cross-Attention and a small target, as one HF model.

Bridge topology (the paper's released architecture, research/methods.md §1.1):

    input_ids [B, T] (source tokens)
      -> frozen source (eval, no_grad) -> hidden_states[source_layer]   [B, T, d_s]
      -> connector stack (masks.cross_attention_allowed: causal unless leaky) -> [B, T, d_t]
      -> target body via inputs_embeds                                  [B, T, d_t]
      -> head over the source vocabulary                                [B, T, V_src]

Decoding keeps three caches (``ComposedCache``): the source's KV cache, the connector's per-layer
projected source keys/values, the target's KV cache. Each new token costs one step of each.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    DynamicCache,
    GenerationConfig,
    GenerationMixin,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration import LLMModulesConfig
from .connector import ConnectorCache, EnhancedCrossAttention
from ..errors import LLMModulesError
from .loading import (
    ModelLike,
    config_from_dict,
    load_causal_lm,
    load_config,
    load_target_body,
    load_tokenizer,
    resolve_dtype,
)
from .masks import cross_attention_allowed, positions_from_padding

WEIGHTS_NAME = "model.safetensors"
# Families whose learned absolute position table is a hard length limit.
ABSOLUTE_POSITION_TYPES = ("gpt2", "gpt_neo", "opt")
MIX_FLOOR = 0.05  # head="source_mix"/"source_pointer": every path of the mixture keeps at least this weight
POINTER_DIM = 64  # head="source_pointer": query/key width of the pointer attention


@dataclass
class ComposedCausalLMOutput(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` plus ``head_logits`` [B, T, V]: with a mixture head (source_mix, source_pointer)
    in training mode, the new head's own logits. Training adds their cross-entropy to the mixture's, so that the
    new head learns every token whatever the gate does (in training mode ``loss`` already includes it when ``labels``
    are given; in evaluation mode ``loss`` is the mixture's alone)."""

    head_logits: torch.FloatTensor | None = None


@dataclass
class ComposedCache:
    """Decoding state of the composed model: one cache per stage."""

    source: DynamicCache | None
    connector: ConnectorCache
    target: DynamicCache
    # head="source_pointer": the past positions it may point at (projected keys [B, T, k], source states [B, T, d_s])
    pointer_keys: torch.Tensor | None = None
    pointer_states: torch.Tensor | None = None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.connector.length()

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        for cache in (self.source, self.target):
            if cache is not None:
                cache.reorder_cache(beam_idx)
        self.connector.reorder(beam_idx)
        if self.pointer_keys is not None:
            self.pointer_keys = self.pointer_keys.index_select(0, beam_idx.to(self.pointer_keys.device))
            self.pointer_states = self.pointer_states.index_select(0, beam_idx.to(self.pointer_states.device))

    def extend_pointer(self, keys: torch.Tensor, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new positions' pointer keys/states; return all of them (past + new)."""
        if self.pointer_keys is not None:
            keys, states = torch.cat([self.pointer_keys, keys], 1), torch.cat([self.pointer_states, states], 1)
        self.pointer_keys, self.pointer_states = keys, states
        return keys, states


def _hidden_size(config: PreTrainedConfig) -> int:
    return int(config.get_text_config().hidden_size)


class LLMModulesForCausalLM(PreTrainedModel, GenerationMixin):
    """A frozen source model feeding a small target through Enhanced Cross-Attention.

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
    ) -> None:
        super().__init__(config)
        if target is None:
            if not config.target_config:
                raise LLMModulesError("LLMModulesConfig has no target_config; build the model with compose()")
            target = load_target_body(config_from_dict(config.target_config), "random")
        source_config = source.config if source is not None else None
        if source_config is None:
            if not config.source_config:
                raise LLMModulesError("LLMModulesConfig has no source_config; build the model with compose()")
            source_config = config_from_dict(config.source_config)
        d_source, d_target = _hidden_size(source_config), _hidden_size(target.config)
        self.connector = EnhancedCrossAttention(
            d_source,
            d_target,
            layers=config.connector_layers,
            heads=config.heads,
            adapter_dim=config.adapter_dim,
            intermediate_dim=config.intermediate_dim,
            gate=config.gate,
            attention_dropout=config.attention_dropout,
        )
        if config.head == "source":
            self.head_projection = nn.Linear(d_target, d_source, bias=False)
        else:
            self.lm_head = nn.Linear(d_target, config.vocab_size, bias=False)
        if config.head in ("source_mix", "source_pointer"):
            if config.source_layer != -1:
                raise LLMModulesError(f"head={config.head!r} reads the source's last layer; use source_layer=-1")
            # Per-position weights of the mixture's paths (source_mix: [source here, new head], one logit, starts
            # at 0.5; source_pointer: [source here, source at the pointed position, new head], softmax of 3).
            self.mix_gate = nn.Linear(d_target, 1 if config.head == "source_mix" else 3)
        if config.head == "source_pointer":
            # One causal attention head over past positions; it picks the source state whose next-token
            # distribution is mixed in. Queries come from the target's stream (which knows where in the format it
            # is); keys from both streams: the source's state says "a fact's value comes next" whatever the
            # entity's name, where the target's alone let the pointer land a few tokens off on names of another
            # length (measured in the fact world: it pointed at "that" instead of "is" and answered the name).
            self.pointer_query = nn.Linear(d_target, POINTER_DIM, bias=False)
            self.pointer_key = nn.Linear(d_target, POINTER_DIM, bias=False)
            self.pointer_key_source = nn.Linear(d_source, POINTER_DIM, bias=False)
        self.post_init()
        # Attached after post_init so that HF weight initialisation never touches pretrained weights.
        self.target = target
        self.source = source
        self.tokenizer = tokenizer
        self._freeze()

    # ----------------------------------------------------------------------------------------- build
    @classmethod
    def compose(
        cls,
        source: ModelLike | None,
        target: ModelLike | PreTrainedConfig,
        *,
        tokenizer: PreTrainedTokenizerBase | str | None = None,
        source_config: PreTrainedConfig | None = None,
        source_revision: str | None = None,
        source_dtype: str | None = None,
        target_init: str = "pretrained",
        **options,
    ) -> LLMModulesForCausalLM:
        """Compose a frozen ``source`` and a ``target`` (hub ids, folders or loaded models).

        options: any ``LLMModulesConfig`` field (``leaky``, ``gate``, ``connector_layers``, ``heads``,
        ``adapter_dim``, ``intermediate_dim``, ``head``, ``source_layer``, ``attention_dropout``).
        ``source=None`` with ``source_config`` builds a model that runs only on precomputed
        ``source_states`` (training from the source-state cache).
        """
        unknown = set(options) - set(LLMModulesConfig.__dataclass_fields__)
        if unknown:
            raise LLMModulesError(
                f"unknown option(s) {sorted(unknown)}; valid options: leaky, gate, connector_layers, heads, "
                "adapter_dim, intermediate_dim, head, source_layer, attention_dropout"
            )
        if source is None and source_config is None:
            raise LLMModulesError("give a source model, or source_config=... to train from cached source states")
        source_model = None if source is None else load_causal_lm("source", source, source_revision, source_dtype)
        source_config = source_model.config if source_model is not None else load_config("source", source_config)
        if tokenizer is None:
            tokenizer = load_tokenizer(source, "source") if source is not None else None
        elif isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = load_tokenizer(str(tokenizer))
        if tokenizer is None:
            raise LLMModulesError("without a source model, pass the source's tokenizer=...")
        if target_init not in ("pretrained", "random"):
            raise LLMModulesError(f"target_init={target_init!r} is not supported; choose 'pretrained' or 'random'")
        body = load_target_body(target, target_init)
        vocab = max(int(source_config.get_text_config().vocab_size), len(tokenizer))
        config = LLMModulesConfig(
            source_name_or_path=_name_of(source, source_model),
            source_revision=source_revision,
            source_config=source_config.to_dict(),
            source_dtype=source_dtype,
            target_name_or_path=_name_of(target, None),
            target_config=body.config.to_dict(),
            target_init=target_init,
            vocab_size=vocab,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
            **options,
        )
        model = cls(config, source=source_model, target=body, tokenizer=tokenizer)
        model.generation_config = GenerationConfig(
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
        )
        return model

    def _freeze(self) -> None:
        if self.source is not None:
            self.source.eval()
            self.source.requires_grad_(False)
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
        return self

    def _init_weights(self, module: nn.Module) -> None:
        """Keep PyTorch's default initialisation (as the release); tanh gates start at 0 in their constructor."""

    def get_input_embeddings(self) -> nn.Module | None:
        return None if self.source is None else self.source.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module | None:
        return getattr(self, "lm_head", None)

    def trainable_parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Named optimizer groups: ``connector`` and ``target`` (target body + output head)."""
        groups: dict[str, list[nn.Parameter]] = {"connector": [], "target": []}
        for name, parameter in self.named_parameters():
            if parameter.requires_grad:
                groups["connector" if name.startswith("connector.") else "target"].append(parameter)
        return groups

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights ``save_pretrained`` writes: every parameter that trains."""
        return {name: p.detach() for name, p in self.named_parameters() if p.requires_grad}

    def gate_values(self) -> list[float]:
        """Mean opening of each cross-attention gate at the last forward pass (NaN before any), for plots and pages."""
        return self.connector.gate_values()

    @property
    def source_hidden_size(self) -> int:
        return _hidden_size(config_from_dict(self.config.source_config))

    # --------------------------------------------------------------------------------------- forward
    @torch.no_grad()
    def source_states(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: DynamicCache | None = None,
    ) -> torch.Tensor:
        """Frozen source states the bridge reads: [B, T] ids -> [B, T, d_s] (what the source-state cache stores)."""
        if self.source is None:
            raise LLMModulesError(
                "this model was built without its source (cache-only); pass source_states=..., "
                "or reload it with the source (from_pretrained(dir) loads config.source_name_or_path)"
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if position_ids is None:
            position_ids = positions_from_padding(attention_mask)[:, -input_ids.shape[1]:]
        layer = self.config.source_layer
        output = self.source.base_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=cache is not None,
            output_hidden_states=layer != -1,
        )
        if layer == -1:
            states = getattr(output, "last_hidden_state", None)
        else:
            hidden = getattr(output, "hidden_states", None)
            states = None if hidden is None else hidden[layer]
        if states is None:
            raise LLMModulesError(
                f"the source {type(self.source).__name__} returned no hidden states; the bridge needs a transformers "
                "causal LM whose base model returns last_hidden_state / supports output_hidden_states=True"
            )
        return states

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
        cache: ComposedCache | None = None,
        use_cache: bool | None = None,
        position_ids: torch.LongTensor | None = None,
        logits_to_keep: int = 0,
        output_attentions: bool = False,
        return_dict: bool = True,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """input_ids [B, T] source tokens (or source_states [B, T, d_s]); labels [B, T], -100 ignored, shifted here.

        With ``cache`` only the new positions are given and ``attention_mask`` covers past + new.
        ``logits_to_keep=k`` computes the head on the last k positions only (decoding).
        """
        if input_ids is None and source_states is None:
            raise LLMModulesError("forward needs input_ids or source_states")
        batch, length = (input_ids if input_ids is not None else source_states).shape[:2]
        use_cache = bool(use_cache) and not self.config.leaky
        past = cache.get_seq_length() if cache is not None else 0
        reference = input_ids if input_ids is not None else source_states
        if attention_mask is None:
            attention_mask = torch.ones(batch, past + length, dtype=torch.long, device=reference.device)
        if attention_mask.shape[1] != past + length:
            raise LLMModulesError(
                f"attention_mask covers {attention_mask.shape[1]} positions but past + new = {past} + {length}"
            )
        position_ids = positions_from_padding(attention_mask)[:, past:]
        self._check_length(position_ids)
        if use_cache and cache is None:
            cache = ComposedCache(
                source=DynamicCache(config=self.source.config) if self.source is not None else None,
                connector=ConnectorCache(),
                target=DynamicCache(config=self.target.config),
            )
        if source_states is None:
            source_states = self.source_states(
                input_ids, attention_mask, position_ids, cache.source if cache is not None else None
            )
        connector_dtype = self.connector.pre_proj.weight.dtype
        absolute = torch.arange(past + length, device=attention_mask.device).expand(batch, -1)
        allowed = cross_attention_allowed(
            absolute[:, past:], absolute, key_valid=attention_mask, leaky=self.config.leaky
        )
        embeds, attention_maps = self.connector(
            source_states.to(connector_dtype),
            allowed,
            cache.connector if cache is not None else None,
            return_attention=output_attentions,
        )
        target_output = self.target(
            inputs_embeds=embeds.to(self.target.dtype),
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache.target if cache is not None else None,
            use_cache=use_cache,
        )
        hidden = target_output.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        pointer = {}
        if self.config.head == "source_pointer":
            # keys are projected once per position and cached projected: a decode step projects only its own
            dtype = self.pointer_key.weight.dtype
            keys = self.pointer_key(target_output.last_hidden_state.to(dtype)) + self.pointer_key_source(
                source_states[:, -target_output.last_hidden_state.shape[1]:].to(dtype))
            states = source_states
            if cache is not None:
                keys, states = cache.extend_pointer(keys, states)
            pointer = dict(pointer_keys=keys, pointer_states=states, pointer_valid=attention_mask)
        logits, head_logits = self._head(hidden, source_states[:, -hidden.shape[1]:], **pointer)
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels)
            if head_logits is not None and self.training:  # evaluation reports the mixture's loss alone
                loss = loss + causal_lm_loss(head_logits, labels)
        return ComposedCausalLMOutput(
            loss=loss,
            logits=logits,
            head_logits=head_logits if self.training else None,
            cache=cache if use_cache else None,
            attentions=tuple(attention_maps) if output_attentions else None,
        )

    def _point(self, hidden: torch.Tensor, keys: torch.Tensor, states: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Pointer attention: hidden [B, t, d_t] (the last t of T positions), projected keys [B, T, POINTER_DIM],
        states [B, T, d_s], valid [B, T] (not padding) -> [B, t, d_s], a causal attention-weighted sum of source states."""
        t, total = hidden.shape[1], keys.shape[1]
        scores = self.pointer_query(hidden) @ keys.transpose(1, 2) / POINTER_DIM**0.5  # [B, t, T]
        rows = torch.arange(total - t, total, device=hidden.device)[:, None]
        columns = torch.arange(total, device=hidden.device)[None, :]
        # causal and not padding; a padding query keeps its own position, so that its row is not all -inf (NaN)
        allowed = ((columns <= rows)[None] & valid[:, None, :].bool()) | (columns == rows)[None]
        weights = scores.float().masked_fill(~allowed, float("-inf")).softmax(-1)
        return weights.to(states.dtype) @ states

    def _head(self, hidden: torch.Tensor, source_states: torch.Tensor, pointer_keys: torch.Tensor | None = None,
              pointer_states: torch.Tensor | None = None, pointer_valid: torch.Tensor | None = None,
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Next-token logits over the source vocabulary: hidden [B, T, d_t], source_states [B, T, d_s] -> ([B, T, V],
        the new head's own logits [B, T, V] for a mixture head, else None).

        new:        a fresh linear head (the release).
        source:     a learned d_t -> d_s projection into the source's frozen output head.
        source_mix: log(g * p_source + (1 - g) * p_new), g = sigmoid(w . hidden) per position (kept off 0 and 1): the
                    source's own next-token distribution mixed in, so every word it knows stays reachable.
        source_pointer: log(g_here * p_source(here) + g_pointed * p_source(pointed) + g_new * p_new), g = softmax
                    over three paths per position (each kept >= MIX_FLOOR). p_source(pointed) is the source's head on
                    an attention-weighted sum of the source states at positions <= i (one causal pointer head,
                    queries from the target's stream, keys from both streams): the model can repeat what the source predicted earlier,
                    e.g. copy the fact its reasoning recalled into the answer, for words that never occurred in the
                    transfer data. The "here" path is source_mix's; kept separate because a pointer that has to
                    learn to stay on its own position fails on word pieces it never saw (measured in the fact
                    world: unseen multi-token words came out stuttered, "nnickel").
        """
        hidden = hidden.to(self.connector.pre_proj.weight.dtype)
        if self.config.head == "new":
            return self.lm_head(hidden), None
        if self.config.head == "source":
            return self._source_head(self.head_projection(hidden)), None
        paths = [self._source_head(source_states).log_softmax(-1)]  # each [B, T, V]
        if self.config.head == "source_pointer":
            pointed = self._point(hidden, pointer_keys, pointer_states, pointer_valid)
            paths.append(self._source_head(pointed).log_softmax(-1))
        new_logits = self.lm_head(hidden).float()
        paths.append(new_logits.log_softmax(-1))
        # Every weight kept >= MIX_FLOOR: a gate that saturates where the source is usually right cuts the new
        # head's gradient at the positions where the source is wrong (measured in the fact world: the trace's
        # format tokens after the thought never got learned). The floor alone was not enough with three paths:
        # the gate kept choosing the source where the barely trained new head was worse (the training loss
        # stalled at 0.28, -log 0.5 on format tokens), so training also adds the new head's own cross-entropy
        # (forward returns head_logits for that; see ComposedCausalLMOutput).
        logits = self.mix_gate(hidden).float()
        if len(paths) == 2:
            weights = torch.cat([torch.sigmoid(logits), torch.sigmoid(-logits)], -1)
        else:
            weights = logits.softmax(-1)  # [B, T, 3]
        weights = MIX_FLOOR + (1 - len(paths) * MIX_FLOOR) * weights
        log_weights = torch.log(weights)  # [B, T, paths]
        mixed = torch.stack([log_weights[..., i, None] + path for i, path in enumerate(paths)]).logsumexp(0)
        return mixed, new_logits

    def _source_head(self, states: torch.Tensor) -> torch.Tensor:  # [B, T, d_s] -> [B, T, V] fp32
        if self.source is None:
            raise LLMModulesError(f"head={self.config.head!r} needs the source's output head; load the source")
        head = self.source.get_output_embeddings()
        logits = head(states.to(head.weight.dtype)).float()
        missing = self.config.vocab_size - logits.shape[-1]
        if missing > 0:  # tokenizer entries beyond the source's vocabulary: the source never predicts them
            logits = F.pad(logits, (0, missing), value=torch.finfo(logits.dtype).min)
        return logits

    # ------------------------------------------------------------------------------------ generation
    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # Our cache is a ComposedCache that forward() creates; generate() must not make a DynamicCache.
        return False

    def prepare_inputs_for_generation(self, input_ids, next_sequence_length=None, cache=None, **kwargs):
        if self.config.leaky:
            # The leaky mask lets earlier positions read later ones, so nothing can be cached: recompute
            # the whole prefix per token, as the release does.
            cache, next_sequence_length = None, None
            kwargs["use_cache"] = False
        elif cache is not None and next_sequence_length is None:
            next_sequence_length = input_ids.shape[1] - cache.get_seq_length()
        inputs = super().prepare_inputs_for_generation(
            input_ids, next_sequence_length=next_sequence_length, cache=cache, **kwargs
        )
        inputs.setdefault("logits_to_keep", 1)
        inputs.pop("position_ids", None)  # recomputed from attention_mask in forward
        return inputs

    # ------------------------------------------------------------------------------------- save/load
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        state_dict: dict[str, torch.Tensor] | None = None,
        **kwargs,
    ) -> None:
        """Write config, trainable weights (safetensors), tokenizer, generation config and a model card.

        The source is referenced by ``config.source_name_or_path``, never copied.
        """
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        if not self.config.source_name_or_path:
            raise LLMModulesError(
                "the source was given as an in-memory model without a folder or hub id; save it with "
                "source.save_pretrained(DIR) and compose from DIR, so the saved model can reference it"
            )
        keep = set(self.trainable_state_dict())
        tensors = state_dict if state_dict is not None else self.state_dict()
        weights = {name: t.detach().contiguous().cpu() for name, t in tensors.items() if name in keep}
        self.config.architectures = [type(self).__name__]
        self.config.save_pretrained(folder)
        save_file(weights, folder / WEIGHTS_NAME, metadata={"format": "pt"})
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(folder)
        self.generation_config.save_pretrained(folder)
        (folder / "README.md").write_text(model_card(self.config, sum(t.numel() for t in weights.values())))

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *model_args,
        config: LLMModulesConfig | None = None,
        source: ModelLike | None = None,
        load_source: bool = True,
        **kwargs,
    ) -> LLMModulesForCausalLM:
        """Rebuild a saved composed model: the source from ``config.source_name_or_path`` (or ``source=``),
        the target from its stored config, then the saved trainable weights on top.

        ``load_source=False`` skips the source (training or evaluation from cached source states).
        """
        folder = _local_folder(pretrained_model_name_or_path, kwargs.get("revision"))
        if not isinstance(config, LLMModulesConfig):
            config = LLMModulesConfig.from_pretrained(folder)
        weights_file = folder / WEIGHTS_NAME
        if not weights_file.exists():
            raise LLMModulesError(f"{folder} holds no {WEIGHTS_NAME}; is it a folder written by save_pretrained()?")
        tokenizer = load_tokenizer(str(folder), "saved model")
        source_model = None
        if load_source:
            source_ref = source if source is not None else config.source_name_or_path
            if source_ref is None:
                raise LLMModulesError(f"{folder}/config.json names no source; pass source=... to from_pretrained")
            source_model = load_causal_lm("source", source_ref, config.source_revision, config.source_dtype)
        body = load_target_body(config_from_dict(config.target_config), "random")
        model = cls(config, source=source_model, target=body, tokenizer=tokenizer)
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
            model.connector.to(resolve_dtype(dtype))
        return model.eval()


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32: logits [B, T, V] predict labels shifted by one; -100 ignored."""
    shifted = logits[:, :-1].float()
    targets = labels[:, 1:].to(shifted.device)
    return F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), ignore_index=-100)


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
- **Topology:** {config.topology}; connector: {config.connector_layers} Enhanced Cross-Attention layers, {config.heads} heads,
  adapter {config.adapter_dim}, gate `{config.gate}`, head `{config.head}`, causal mask: {not config.leaky}
- **Saved trainable parameters:** {saved_parameters:,}

```python
import llm_modules  # registers the architecture with the Auto classes
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER")  # loads the source from its reference
```
Method: Kolomeitsev, *LLM Modules: Knowledge Transfer from a Large to a Small Model using Enhanced
Cross-Attention*, arXiv:2502.08213 (2025). {"This model uses the released padding-only (leaky) mask: its teacher-forced loss is not a next-token loss." if config.leaky else ""}
"""


AutoConfig.register(LLMModulesConfig.model_type, LLMModulesConfig)
AutoModelForCausalLM.register(LLMModulesConfig, LLMModulesForCausalLM)
