"""Saving and loading a composed model: config, trainable weights (safetensors), tokenizer(s), a model card.

The source (and a fusion model's frozen target) is referenced by name or path, never copied: a saved folder holds
only what trained. Loading rebuilds the references, then puts the saved weights on top and refuses a file that
does not match the model its config describes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import GenerationConfig, PreTrainedModel

from ..errors import LLMModulesError
from .configuration import LLMModulesConfig
from .fusion import SOURCE_TOKENIZER_FOLDER
from .loading import ModelLike, check_safetensors, load_causal_lm, load_tokenizer, resolve_dtype
from .topologies import topology_for

WEIGHTS_NAME = "model.safetensors"


def legacy_key_map(config: LLMModulesConfig) -> dict[str, str]:
    """Weight-name prefixes written before the heads became modules of their own (``heads.py``) -> today's."""
    new_head = "head.linear." if config.head == "new" else "head.base.linear."
    return {"lm_head.": new_head, "head_projection.": "head.projection.", "mixture.": "head.mixture."}


def rename_legacy_keys(state: dict[str, torch.Tensor], config: LLMModulesConfig) -> dict[str, torch.Tensor]:
    renamed = {}
    for name, tensor in state.items():
        for old, new in legacy_key_map(config).items():
            if name.startswith(old):
                name = new + name[len(old):]
                break
        renamed[name] = tensor
    return renamed


def save_composed(model: PreTrainedModel, save_directory: str | os.PathLike,
                  state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write config, trainable weights, tokenizer(s), generation config and a model card into ``save_directory``."""
    folder = Path(save_directory)
    folder.mkdir(parents=True, exist_ok=True)
    if not model.config.source_name_or_path:
        raise LLMModulesError(
            "the source was given as an in-memory model without a folder or hub id; save it with "
            "source.save_pretrained(DIR) and compose from DIR, so the saved model can reference it"
        )
    model.topology.check_saveable(model)
    keep = set(model.trainable_state_dict())
    tensors = state_dict if state_dict is not None else model.state_dict()
    weights = {name: t.detach().contiguous().cpu() for name, t in tensors.items() if name in keep}
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    save_file(weights, folder / WEIGHTS_NAME, metadata={"format": "pt"})
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(folder)
    model.topology.save_extra(model, folder)
    model.generation_config.save_pretrained(folder)
    card = model_card(model.config, model.topology.describe(model.config), sum(t.numel() for t in weights.values()))
    (folder / "README.md").write_text(card)


def load_composed(cls: type[PreTrainedModel], name: str | os.PathLike, config: LLMModulesConfig | None,
                  source: ModelLike | None, target: ModelLike | None, load_source: bool,
                  kwargs: dict[str, Any]) -> PreTrainedModel:
    """Rebuild a saved composed model (``LLMModulesForCausalLM.from_pretrained``)."""
    folder = local_folder(name, kwargs.get("revision"))
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
    body = topology_for(config.topology).saved_target(config, target, folder)
    model = cls(config, source=source_model, target=body, tokenizer=tokenizer, source_tokenizer=source_tokenizer)
    check_safetensors(weights_file)  # a damaged or truncated file is named, never half-loaded
    state = rename_legacy_keys(load_file(weights_file), config)
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
    if (folder / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    dtype = kwargs.get("dtype") or kwargs.get("torch_dtype")
    if dtype not in (None, "auto"):
        model.topology.new_modules(model).to(resolve_dtype(dtype))
    return model.eval()


def local_folder(name: str | os.PathLike, revision: str | None) -> Path:
    """A saved composed model's folder: a local path, or a hub repository downloaded."""
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


def model_card(config: LLMModulesConfig, topology_line: str, saved_parameters: int) -> str:
    """A short model card naming both base models and how to load the result."""
    target = config.target_name_or_path or f"a {config.target_config.get('model_type')} config"
    leak = "This model uses the released padding-only (leaky) mask: its teacher-forced loss is not a next-token loss."
    return f"""---
library_name: transformers
tags: [llm-modules, knowledge-transfer, cross-attention]
base_model: [{json.dumps(config.source_name_or_path)}]
---
# LLM Modules composition

- **Source (frozen, referenced, not stored here):** `{config.source_name_or_path}` (revision `{config.source_revision}`)
- **Target:** `{target}` (init: `{config.target_init}`)
- **Topology:** {topology_line}
  adapter {config.adapter_dim}, gate `{config.gate}`, head `{config.head}`, causal mask: {not config.leaky}
- **Saved trainable parameters:** {saved_parameters:,}

```python
import llm_modules  # registers the architecture with the Auto classes
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER")  # loads the source from its reference
```
Methods: Kolomeitsev, *LLM Modules: Knowledge Transfer from a Large to a Small Model using Enhanced
Cross-Attention*, arXiv:2502.08213 (2025); fusion after Flamingo (arXiv:2204.14198) and CALM
(arXiv:2401.02412). {leak if config.leaky else ""}
"""
