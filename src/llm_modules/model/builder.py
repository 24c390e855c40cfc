"""Building a composed model: ``compose()`` from hub ids, folders or loaded models."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from transformers import GenerationConfig, PreTrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from ..errors import LLMModulesError
from .configuration import ComposeOptions, LLMModulesConfig
from .loading import ModelLike, load_causal_lm, load_config
from .topologies import topology_for


def compose_model(
    cls: type[PreTrainedModel],
    source: ModelLike | None,
    target: ModelLike | PreTrainedConfig,
    tokenizer: PreTrainedTokenizerBase | str | None,
    source_tokenizer: PreTrainedTokenizerBase | str | None,
    source_config: PreTrainedConfig | None,
    source_revision: str | None,
    source_dtype: str | None,
    target_init: str,
    options: dict[str, Any],
) -> PreTrainedModel:
    """``LLMModulesForCausalLM.compose`` (its docstring says what each argument is)."""
    options = ComposeOptions.from_mapping({**options, "target_init": target_init}).to_kwargs()
    target_init = options.pop("target_init")
    if source is None and source_config is None:
        raise LLMModulesError("give a source model, or source_config=... to train from cached source states")
    topology = topology_for(options.get("topology", "bridge"))
    source_model = None if source is None else load_causal_lm("source", source, source_revision, source_dtype)
    source_config = source_model.config if source_model is not None else load_config("source", source_config)
    parts = topology.compose_parts(source, target, tokenizer, source_tokenizer, source_config, target_init, options)
    ids = parts.tokenizer
    config = LLMModulesConfig(
        source_name_or_path=name_of(source, source_model),
        source_revision=source_revision,
        source_config=source_config.to_dict(),
        source_dtype=source_dtype,
        target_name_or_path=name_of(target, None),
        target_config=parts.target.config.to_dict(),
        target_init=target_init,
        vocab_size=parts.vocab_size,
        shared_tokenizer=parts.shared_tokenizer,
        pad_token_id=ids.pad_token_id,
        eos_token_id=ids.eos_token_id,
        bos_token_id=ids.bos_token_id,
        **options,
    )
    model = cls(config, source=source_model, target=parts.target, tokenizer=ids, source_tokenizer=parts.source_tokenizer)
    model.generation_config = GenerationConfig(
        pad_token_id=ids.pad_token_id if ids.pad_token_id is not None else ids.eos_token_id,
        eos_token_id=ids.eos_token_id,
        bos_token_id=ids.bos_token_id,
    )
    return model


def name_of(given: object, model: PreTrainedModel | None) -> str | None:
    """How a saved model will reference ``given``: an absolute folder path, or a hub id."""
    if isinstance(given, (str, os.PathLike)):
        text = str(given)
        return str(Path(text).resolve()) if Path(text).exists() else text
    candidate = model.name_or_path if model is not None else getattr(given, "name_or_path", None)
    if candidate and Path(candidate).exists():
        return str(Path(candidate).resolve())
    return candidate or None
