"""Source-state cache: the frozen source's hidden states for a dataset, computed once, reused every epoch.

Layout of a cache folder::

    manifest.json               fields that must match + {example key -> shard file}
    states-00000.safetensors    one [T_i, d_s] tensor per example (float16/bfloat16/float32)
    ...

An example's key is the sha256 of its input_ids, so the cache serves any split, order or subset
of the rows it holds. The manifest's fields (source id and revision, a fingerprint of the
source's weight files, layer, source dtype, tokenizer, template, max length, hidden size, storage
dtype) are compared with the run's; any difference is refused with the field, both values and
the fix. A build interrupted mid-way keeps its finished shards: the next run computes only the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from dataclasses import fields as dataclass_fields
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import PreTrainedTokenizerBase

from ..errors import LLMModulesError

MANIFEST = "manifest.json"
VERSION = 1
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

# A function [B, T] ids, [B, T] mask -> [B, T, d_s] states (``LLMModulesForCausalLM.source_states``).
StatesFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class StaleCacheError(LLMModulesError):
    """The cache on disk was computed for something else than this run."""


def example_key(input_ids: Sequence[int]) -> str:
    """The cache key of one example: sha256 of its token ids (first 32 hex digits)."""
    return hashlib.sha256(json.dumps(list(map(int, input_ids))).encode()).hexdigest()[:32]


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of the vocabulary, the special tokens and the chat template (first 16 hex digits)."""
    digest = hashlib.sha256()
    digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    digest.update(str(getattr(tokenizer, "chat_template", "") or "").encode())
    return digest.hexdigest()[:16]


def weights_fingerprint(source: str | os.PathLike | None) -> str:
    """For a local folder: sha256 over each weight file's name, size and first MiB. For a hub id: ''.

    Cheap (no full read) yet it changes when a folder is re-saved with other weights.
    """
    if source is None:
        return ""
    folder = Path(source).expanduser()
    if not folder.is_dir():
        return ""
    digest = hashlib.sha256()
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf") or p.name == "config.json")
    for path in files:
        digest.update(f"{path.name}:{path.stat().st_size}".encode())
        with path.open("rb") as handle:
            digest.update(handle.read(1 << 20))
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class CacheFields:
    """Everything the cached states depend on. Two runs may share a cache only if all fields match."""

    source: str
    source_revision: str | None
    source_weights: str
    source_layer: int | list  # one hidden_states index, or the names of several taps (SemAlign: "contribution:12", "final")
    source_dtype: str | None
    tokenizer: str
    template: str
    max_length: int
    hidden_size: int
    dtype: str
    layout: str = "bridge"  # what a row's states are: the bridge's [T, d_s], or fusion's source view [S, L, d_s]

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise LLMModulesError(f"cache dtype {self.dtype!r} is not supported; choose one of {sorted(DTYPES)}")


class SourceStateCache:
    """A folder of cached source states; open with :meth:`open`, fill with :meth:`build`."""

    def __init__(self, folder: str | os.PathLike, fields: CacheFields) -> None:
        self.folder = Path(folder)
        self.fields = fields
        self.entries: dict[str, str] = {}  # example key -> shard file name
        self._handles: dict[str, object] = {}

    # ------------------------------------------------------------------------------------ open/check
    @classmethod
    def open(cls, folder: str | os.PathLike, fields: CacheFields) -> SourceStateCache:
        """Open (or start) the cache in ``folder``; a manifest with other fields raises StaleCacheError."""
        cache = cls(folder, fields)
        manifest = cache.folder / MANIFEST
        if not manifest.exists():
            if cache.folder.exists() and any(cache.folder.iterdir()):
                raise LLMModulesError(f"{cache.folder} is not empty and holds no {MANIFEST}; give an empty or new cache folder")
            return cache
        try:
            stored = json.loads(manifest.read_text())
        except json.JSONDecodeError as error:
            raise StaleCacheError(f"{manifest} is corrupt ({error}); delete {cache.folder} and run again") from error
        if stored.get("version") != VERSION:
            raise StaleCacheError(f"{manifest} has format version {stored.get('version')}, this code reads {VERSION}; "
                                  f"delete {cache.folder} (or pass rebuild_cache) to recompute it")
        defaults = {f.name: f.default for f in dataclass_fields(CacheFields)}  # fields added later: their default
        differences = [
            f"{name}: cache has {stored['fields'].get(name, defaults[name])!r}, this run has {value!r}"
            for name, value in asdict(fields).items()
            if stored["fields"].get(name, defaults[name]) != value
        ]
        if differences:
            raise StaleCacheError(
                f"the source-state cache in {cache.folder} was computed for other settings and cannot be used: "
                + "; ".join(differences)
                + f". Use another cache folder, or delete {cache.folder} (train option rebuild_cache: true) to recompute it"
            )
        cache.entries = dict(stored["entries"])
        return cache

    def missing(self, examples: Sequence[Sequence[int]]) -> list[int]:
        """Indices of the examples (lists of input_ids) the cache does not hold."""
        return [i for i, ids in enumerate(examples) if example_key(ids) not in self.entries]

    def covers(self, examples: Sequence[Sequence[int]]) -> bool:
        return not self.missing(examples)

    # ----------------------------------------------------------------------------------------- build
    def build(
        self,
        examples: Sequence[Sequence[int]],
        states_fn: StatesFn,
        batch_size: int = 8,
        shard_bytes: int = 1 << 30,
        device: str | torch.device = "cpu",
        progress: bool = True,
        rows_fn: Callable[[list[list[int]]], list[torch.Tensor]] | None = None,
    ) -> int:
        """Compute and store the states of every example the cache lacks; return how many were computed.

        examples: lists of input_ids; states_fn: [B, T] ids, [B, T] mask -> [B, T, d_s].
        Batches are formed from length-sorted examples with right padding (no padding reaches a
        real token through the causal source); each example keeps its own [T_i, d_s] slice.
        rows_fn: instead of states_fn, a function from a batch of examples to one tensor per example
        (fusion: [S_i, L, d_s], S_i source tokens that need not be as many as the example's ids).
        """
        todo: dict[str, list[int]] = {}
        for ids in examples:
            key = example_key(ids)
            if key not in self.entries:
                todo.setdefault(key, list(ids))
        if not todo:
            return 0
        self.folder.mkdir(parents=True, exist_ok=True)
        dtype = DTYPES[self.fields.dtype]
        order = sorted(todo, key=lambda k: len(todo[k]))
        pending: dict[str, torch.Tensor] = {}
        pending_bytes = 0
        from tqdm.auto import tqdm

        bar = tqdm(total=len(order), desc="source-state cache", unit="row", disable=not progress)
        for start in range(0, len(order), batch_size):
            keys = order[start: start + batch_size]
            if rows_fn is not None:
                with torch.no_grad():
                    rows = rows_fn([todo[k] for k in keys])
                for key, tensor in zip(keys, rows):
                    if tensor.shape[-1] != self.fields.hidden_size:
                        raise LLMModulesError(f"the source gave states of width {tensor.shape[-1]}, the cache "
                                              f"expects {self.fields.hidden_size}")
                    pending[key] = tensor.to("cpu", dtype).contiguous()
                    pending_bytes += pending[key].numel() * pending[key].element_size()
                if pending_bytes >= shard_bytes:
                    self._write_shard(pending)
                    pending, pending_bytes = {}, 0
                bar.update(len(keys))
                continue
            length = max(len(todo[k]) for k in keys)
            ids = torch.zeros((len(keys), length), dtype=torch.long)
            mask = torch.zeros((len(keys), length), dtype=torch.long)
            for row, key in enumerate(keys):
                ids[row, : len(todo[key])] = torch.tensor(todo[key])
                mask[row, : len(todo[key])] = 1
            with torch.no_grad():
                states = states_fn(ids.to(device), mask.to(device))
            if states.shape[-1] != self.fields.hidden_size:
                raise LLMModulesError(f"the source gave states of width {states.shape[-1]}, the cache expects "
                                      f"{self.fields.hidden_size}")
            for row, key in enumerate(keys):
                tensor = states[row, : len(todo[key])].to("cpu", dtype).contiguous()
                pending[key] = tensor
                pending_bytes += tensor.numel() * tensor.element_size()
            if pending_bytes >= shard_bytes:
                self._write_shard(pending)
                pending, pending_bytes = {}, 0
            bar.update(len(keys))
        bar.close()
        if pending:
            self._write_shard(pending)
        return len(order)

    def _write_shard(self, tensors: dict[str, torch.Tensor]) -> None:
        index = len(set(self.entries.values()))
        name = f"states-{index:05d}.safetensors"
        while (self.folder / name).exists():
            index += 1
            name = f"states-{index:05d}.safetensors"
        save_file(tensors, self.folder / name, metadata={"fields": json.dumps(asdict(self.fields))})
        self.entries.update({key: name for key in tensors})
        manifest = {"version": VERSION, "fields": asdict(self.fields), "entries": self.entries}
        temporary = self.folder / (MANIFEST + ".tmp")
        temporary.write_text(json.dumps(manifest))
        temporary.replace(self.folder / MANIFEST)  # atomic: a crash never leaves a half-written manifest

    # ------------------------------------------------------------------------------------------ read
    def get(self, input_ids: Sequence[int]) -> torch.Tensor:
        """The stored states of one example: [T, d_s] (or [T, n, d_s] for several taps) in the cache dtype."""
        key = example_key(input_ids)
        shard = self.entries.get(key)
        if shard is None:
            raise LLMModulesError(f"the source-state cache in {self.folder} holds no entry for this example "
                                  f"({len(input_ids)} tokens); build it first")
        handle = self._handles.get(shard)
        if handle is None:
            handle = self._handles[shard] = safe_open(str(self.folder / shard), framework="pt")
        return handle.get_tensor(key)

    def size_bytes(self) -> int:
        return sum((self.folder / name).stat().st_size for name in set(self.entries.values()))

    def __getstate__(self) -> dict:  # dataloader workers reopen the shards themselves
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state


class CachedStatesDataset(torch.utils.data.Dataset):
    """Rows of a tokenized dataset with their cached ``source_states`` [T, d_s] added."""

    def __init__(self, dataset, cache: SourceStateCache) -> None:
        self.dataset = dataset
        self.cache = cache

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        row = dict(self.dataset[index])
        row["source_states"] = self.cache.get(row["input_ids"])
        return row
