"""Resolve "a hub id, a local folder or a loaded model" into models, configs and tokenizers.

Every failure becomes an ``LLMModulesError`` that says what was given and what would work.
Weights load from safetensors only (``use_safetensors=True``: a folder holding only pickled
``pytorch_model.bin`` weights is refused, since unpickling can run code), and code shipped with a
model (``trust_remote_code``) runs only inside ``with allow_remote_code(True):``, which the
``trust_remote_code`` run option sets.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
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

# Off unless a caller asks (the run option trust_remote_code): a context variable, so that every
# loader below honours it without threading a flag through each model-building signature.
_REMOTE_CODE: ContextVar[bool] = ContextVar("llm_modules_trust_remote_code", default=False)
PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")


@contextmanager
def allow_remote_code(allowed: bool = True) -> Iterator[None]:
    """Within this block, loaders pass ``trust_remote_code=allowed`` to transformers (default: False)."""
    token = _REMOTE_CODE.set(bool(allowed))
    try:
        yield
    finally:
        _REMOTE_CODE.reset(token)


def _safe_kwargs(revision: str | None = None, weights: bool = False) -> dict:
    """Keyword arguments every ``from_pretrained`` here gets: no remote code unless allowed, safetensors weights."""
    kwargs: dict = {"trust_remote_code": _REMOTE_CODE.get()}
    if revision:
        kwargs["revision"] = revision
    if weights:
        kwargs["use_safetensors"] = True
    return kwargs


def _refuse_pickled_weights(role: str, name: object) -> None:
    folder = Path(str(name)).expanduser()
    if folder.is_dir() and not any(folder.glob("*.safetensors")) and not any(folder.glob("*.gguf")):
        pickled = [p.name for p in folder.iterdir() if p.name in PICKLED_WEIGHTS or p.suffix in (".bin", ".pt", ".pth")]
        if pickled:
            raise LLMModulesError(
                f"the {role} folder {folder} holds pickled weights ({', '.join(sorted(pickled))}) and no safetensors; "
                "llm-modules loads safetensors only (unpickling can run code). Convert them once where you trust the "
                "file: AutoModelForCausalLM.from_pretrained(folder).save_pretrained(new_folder)"
            )


def _describe(name: object) -> str:
    return f"'{name}'"


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name.strip("/").split("/", 1)[-1] or Path(name).exists()


def _load_error(role: str, name: object, error: Exception) -> LLMModulesError:
    text = str(name)
    if "trust_remote_code" in str(error) and not _REMOTE_CODE.get():
        return LLMModulesError(f"the {role} model {_describe(name)} ships its own Python code, which llm-modules does not "
                               "run unless asked: read that code, then set the run option trust_remote_code: true")
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
    """A causal LM from a hub id, a folder or a loaded model.

    ``dtype=None``: the checkpoint's dtype, except for the ``source`` on a CPU without native bf16, which loads in
    float32 (:func:`default_dtype`; the choice and its reason are printed). Trained models are made float32 by
    their callers."""
    if isinstance(name, PreTrainedModel):
        return name
    if isinstance(name, torch.nn.Module):
        raise LLMModulesError(
            f"the {role} must be a transformers PreTrainedModel (or a hub id / folder), got {type(name).__name__}"
        )
    if not isinstance(name, (str, os.PathLike)):
        raise LLMModulesError(f"the {role} must be a hub id, a folder or a loaded model, got {type(name).__name__}")
    _refuse_pickled_weights(role, name)
    kwargs = _safe_kwargs(revision, weights=True)
    if dtype is None and role == "source":  # the frozen model that only reads: its speed is the dtype's
        checkpoint = _checkpoint_dtype(name, revision)
        chosen, why = default_dtype(checkpoint)
        if checkpoint in (torch.bfloat16, torch.float16):  # the choice that matters for speed: say it
            shown = chosen or str(checkpoint).removeprefix("torch.")
            print(f"{role}: loading in {shown} ({why}; set source_dtype to override)", file=sys.stderr)
        dtype = chosen
    if dtype is not None:
        kwargs["dtype"] = resolve_dtype(dtype)
    try:
        return AutoModelForCausalLM.from_pretrained(str(name), **kwargs)
    except Exception as error:  # transformers raises OSError, ValueError, KeyError... for bad names
        raise _load_error(role, name, error) from error


def cpu_has_native_bf16() -> bool:
    """Does this CPU compute bfloat16 natively (AVX512-BF16 or AMX)? Read from the kernel's CPU flags (Linux).

    Without it (AVX2 only), every bf16 matmul converts to fp32 and back: a bf16 1.5B model prefilled at
    ~8 tok/s against ~35-42 tok/s in fp32 on such a CPU (issue 23). Where the flags cannot be read, False.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_dtype(checkpoint: torch.dtype | None, cuda: bool | None = None) -> tuple[str | None, str]:
    """(dtype to load a frozen model in, why) when none was asked for; (None, why) keeps the checkpoint's.

    A half-precision checkpoint loads in float32 on a CPU without native bf16 (fp16 has no fast CPU kernels
    at all); on a GPU or a bf16-capable CPU it keeps its own dtype.
    """
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if checkpoint not in (torch.bfloat16, torch.float16):
        return None, f"the checkpoint is {checkpoint}"
    if cuda:
        return None, "a GPU is available"
    if checkpoint == torch.bfloat16 and cpu_has_native_bf16():
        return None, "this CPU computes bfloat16 natively"
    return "float32", f"the checkpoint is {str(checkpoint).removeprefix('torch.')} and this CPU has no native " \
                      f"{'bfloat16' if checkpoint == torch.bfloat16 else 'float16'} kernels"


def _checkpoint_dtype(name: ModelLike, revision: str | None) -> torch.dtype | None:
    """The dtype a checkpoint's config records (``dtype`` or ``torch_dtype``), without loading weights."""
    try:
        config = AutoConfig.from_pretrained(str(name), **_safe_kwargs(revision))
    except Exception:  # the load below reports a bad name with its own message
        return None
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    try:
        return resolve_dtype(str(value).removeprefix("torch.")) if value is not None else None
    except LLMModulesError:
        return None


def load_config(role: str, name: ModelLike | PreTrainedConfig, revision: str | None = None) -> PreTrainedConfig:
    if isinstance(name, PreTrainedConfig):
        return name
    if isinstance(name, PreTrainedModel):
        return name.config
    try:
        return AutoConfig.from_pretrained(str(name), **_safe_kwargs(revision))
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
    _refuse_pickled_weights("target", target)
    try:
        return AutoModel.from_pretrained(str(target), dtype=torch.float32, **_safe_kwargs(revision, weights=True))
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
        tokenizer = AutoTokenizer.from_pretrained(str(name), **_safe_kwargs())
    except Exception as error:
        raise LLMModulesError(
            f"could not load a tokenizer from {_describe(name)} ({type(error).__name__}: {error}); pass tokenizer=..."
        ) from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenizer_of(given: object, model_ref: object, role: str) -> PreTrainedTokenizerBase | None:
    """A tokenizer given as an object or path, else the one saved beside ``model_ref`` (None if neither)."""
    if isinstance(given, PreTrainedTokenizerBase):
        return given
    if isinstance(given, (str, os.PathLike)):
        return load_tokenizer(str(given), role)
    if model_ref is None or isinstance(model_ref, PreTrainedConfig):
        return None
    return load_tokenizer(model_ref, role)


def check_safetensors(path: str | os.PathLike) -> None:
    """Raise LLMModulesError naming ``path`` unless it is a whole safetensors file.

    Reads only the header: an 8-byte little-endian length, a JSON header, then the tensors'
    byte ranges, which must end exactly at the end of the file (a truncated copy fails here).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise ValueError(f"{size} bytes, shorter than the 8-byte header length")
            length = int.from_bytes(prefix, "little")
            if length > size - 8:
                raise ValueError(f"header of {length} bytes does not fit in {size} bytes")
            header = json.loads(handle.read(length))
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        if 8 + length + max(ends, default=0) != size:
            raise ValueError(f"its tensors end at byte {8 + length + max(ends, default=0)}, the file has {size}")
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as error:
        raise LLMModulesError(f"{path} is not a complete safetensors file ({error}); it was truncated or "
                              "damaged: delete it (or the checkpoint holding it) and write it again") from error
