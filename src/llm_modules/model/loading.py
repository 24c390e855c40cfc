"""Resolve "a hub id, a local folder or a loaded model" into models, configs and tokenizers.

Every failure becomes an ``LLMModulesError`` that says what was given and what would work.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ..errors import LLMModulesError

ModelLike = str | os.PathLike | PreTrainedModel


def _describe(name: object) -> str:
    return f"'{name}'"


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name.strip("/").split("/", 1)[-1] or Path(name).exists()


def _load_error(role: str, name: object, error: Exception) -> LLMModulesError:
    text = str(name)
    if _looks_local(text) and not Path(text).expanduser().exists():
        hint = f"the folder {text} does not exist; give an existing folder holding config.json and weights"
    elif Path(text).expanduser().is_dir() and not (Path(text).expanduser() / "config.json").exists():
        hint = f"the folder {text} has no config.json; save the model there with save_pretrained()"
    else:
        hint = "give a local folder saved with save_pretrained(), a loaded model, or a hub id on a machine with hub access"
    return LLMModulesError(f"could not load the {role} model {_describe(name)}: {hint}. ({type(error).__name__}: {error})")


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise LLMModulesError(f"dtype {dtype!r} is not supported; choose one of {sorted(table)}")
    return table[dtype]


def load_causal_lm(role: str, name: ModelLike, revision: str | None = None, dtype: str | None = None) -> PreTrainedModel:
    """A causal LM from a hub id, a folder or a loaded model."""
    if isinstance(name, PreTrainedModel):
        return name
    if isinstance(name, torch.nn.Module):
        raise LLMModulesError(
            f"the {role} must be a transformers PreTrainedModel (or a hub id / folder), got {type(name).__name__}"
        )
    if not isinstance(name, (str, os.PathLike)):
        raise LLMModulesError(f"the {role} must be a hub id, a folder or a loaded model, got {type(name).__name__}")
    kwargs = {"revision": revision} if revision else {}
    if dtype is not None:
        kwargs["dtype"] = resolve_dtype(dtype)
    try:
        return AutoModelForCausalLM.from_pretrained(str(name), **kwargs)
    except Exception as error:  # transformers raises OSError, ValueError, KeyError... for bad names
        raise _load_error(role, name, error) from error


def load_config(role: str, name: ModelLike | PreTrainedConfig, revision: str | None = None) -> PreTrainedConfig:
    if isinstance(name, PreTrainedConfig):
        return name
    if isinstance(name, PreTrainedModel):
        return name.config
    try:
        return AutoConfig.from_pretrained(str(name), **({"revision": revision} if revision else {}))
    except Exception as error:
        raise _load_error(role, name, error) from error


def config_from_dict(data: dict) -> PreTrainedConfig:
    """Rebuild a model config from its ``to_dict()`` (as stored inside ``LLMModulesConfig``)."""
    data = dict(data)
    model_type = data.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise LLMModulesError(f"stored config has model_type {model_type!r}, which this transformers does not know")
    return CONFIG_MAPPING[model_type].from_dict(data)


def load_target_body(
    target: ModelLike | PreTrainedConfig, init: str, revision: str | None = None
) -> PreTrainedModel:
    """The target's decoder body (no LM head): pretrained weights, or random weights from its config.

    Always float32: the target trains, and mixed precision belongs to autocast, not to the master weights.
    """
    if init == "random":
        config = load_config("target", target, revision)
        return AutoModel.from_config(config, dtype=torch.float32)
    if isinstance(target, PreTrainedConfig):
        raise LLMModulesError("target_init='pretrained' needs target weights; a config alone gives target_init='random'")
    if isinstance(target, PreTrainedModel):
        return target.base_model.float()
    if isinstance(target, torch.nn.Module):
        raise LLMModulesError(f"the target must be a transformers PreTrainedModel, got {type(target).__name__}")
    try:
        return AutoModel.from_pretrained(
            str(target), dtype=torch.float32, **({"revision": revision} if revision else {})
        )
    except Exception as error:
        raise _load_error("target", target, error) from error


def load_target_lm(target: ModelLike | PreTrainedConfig, init: str, revision: str | None = None) -> PreTrainedModel:
    """The whole target causal LM (embeddings, body, head), as the fusion topology keeps it; float32."""
    if init == "random":
        return AutoModelForCausalLM.from_config(load_config("target", target, revision), dtype=torch.float32)
    if isinstance(target, PreTrainedConfig):
        raise LLMModulesError("target_init='pretrained' needs target weights; a config alone gives target_init='random'")
    if isinstance(target, PreTrainedModel):
        if not hasattr(target, "get_output_embeddings") or target.get_output_embeddings() is None:
            raise LLMModulesError(f"the fusion target must be a causal LM with its head, got {type(target).__name__}")
        return target.float()
    model = load_causal_lm("target", target, revision)
    return model.float()


def load_tokenizer(name: ModelLike | PreTrainedTokenizerBase | None, role: str = "source") -> PreTrainedTokenizerBase:
    """The tokenizer of ``name`` (a folder, hub id, or a model whose ``name_or_path`` is a folder)."""
    if isinstance(name, PreTrainedTokenizerBase):
        return name
    if isinstance(name, PreTrainedModel):
        name = name.name_or_path or None
    if not name:
        raise LLMModulesError(f"no tokenizer could be found for the {role}; pass tokenizer=... explicitly")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(name))
    except Exception as error:
        raise LLMModulesError(
            f"could not load a tokenizer from {_describe(name)} ({type(error).__name__}: {error}); pass tokenizer=..."
        ) from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
