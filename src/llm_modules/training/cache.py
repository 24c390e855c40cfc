"""Source-state cache: the frozen source's hidden states for a dataset, computed once, reused every epoch.

Layout of a cache folder::

    manifest.json                  fields that must match, {example key -> shard}, {shard -> bytes, sha256}
    manifest.part-R.json           what rank R of a running (or killed) build has written so far
    states-R-00000.safetensors     one [T_i, d_s] tensor per example (float16/bfloat16/float32), written by rank R
    ...

An example's key is the sha256 of its input_ids, so the cache serves any split, order or subset
of the rows it holds. The manifest's fields (source id and revision, a fingerprint of the
source's weight files, layer, source dtype, tokenizer, template, max length, hidden size, storage
dtype) are compared with the run's; any difference is refused with the field, both values and
the fix.

Crash safety: every shard and manifest is written atomically (temporary file, fsync, rename), a
shard is listed only after it is complete, and :meth:`SourceStateCache.consolidate` checks each
listed shard's length, header and sha256 before a run uses it. A build killed mid-way keeps its
finished shards (the next run computes only the rest); a damaged shard is deleted and its rows
recomputed, with a message naming the file.

Distributed builds: every rank computes its own batches into its own shards and part manifest;
after a barrier the main rank merges the parts into ``manifest.json`` and every rank reads the
whole cache. Batches are formed over all rows of the run (length-sorted, fixed size), so the
states of a row do not depend on the number of ranks or on where an earlier build was killed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from dataclasses import fields as dataclass_fields
from fnmatch import fnmatch
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save
from transformers import PreTrainedTokenizerBase

from ..errors import LLMModulesError
from ..model.loading import check_safetensors
from .atomic import atomic_write_bytes, atomic_write_json, file_sha256, is_temporary

MANIFEST = "manifest.json"
PART = "manifest.part-{rank:03d}.json"
PART_GLOB = "manifest.part-*.json"
VERSION = 2  # 2: shards carry their byte count and sha256
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
    """A folder of cached source states; open with :meth:`open`, fill with :meth:`build`, merge with :meth:`consolidate`."""

    def __init__(self, folder: str | os.PathLike, fields: CacheFields) -> None:
        self.folder = Path(folder)
        self.fields = fields
        self.entries: dict[str, str] = {}  # example key -> shard file name
        self.shards: dict[str, dict] = {}  # shard file name -> {"bytes": int, "sha256": str}
        self._handles: dict[str, object] = {}

    # ------------------------------------------------------------------------------------ open/check
    @classmethod
    def open(cls, folder: str | os.PathLike, fields: CacheFields) -> SourceStateCache:
        """Open (or start) the cache in ``folder`` from its ``manifest.json``; other fields raise StaleCacheError."""
        cache = cls(folder, fields)
        manifest = cache.folder / MANIFEST
        if not manifest.exists():
            strangers = [p.name for p in cache.folder.iterdir() if not is_cache_file(p)] if cache.folder.exists() else []
            if strangers:
                raise LLMModulesError(f"{cache.folder} holds files that are not a source-state cache ({', '.join(strangers[:3])}) "
                                      f"and no {MANIFEST}; give an empty or new cache folder")
            return cache
        stored = cache._read_manifest(manifest)
        cache.entries, cache.shards = dict(stored["entries"]), dict(stored["shards"])
        return cache

    def _read_manifest(self, path: Path) -> dict:
        try:
            stored = json.loads(path.read_text())
            if not isinstance(stored, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as error:
            raise StaleCacheError(f"{path} is corrupt ({error}); delete {self.folder} (or pass rebuild_cache) "
                                  "to recompute the cache") from error
        if stored.get("version") != VERSION:
            raise StaleCacheError(f"{path} has format version {stored.get('version')}, this code reads {VERSION}; "
                                  f"delete {self.folder} (or pass rebuild_cache) to recompute it")
        defaults = {f.name: f.default for f in dataclass_fields(CacheFields)}  # fields added later: their default
        differences = [
            f"{name}: cache has {stored['fields'].get(name, defaults[name])!r}, this run has {value!r}"
            for name, value in asdict(self.fields).items()
            if stored["fields"].get(name, defaults[name]) != value
        ]
        if differences:
            raise StaleCacheError(
                f"the source-state cache in {self.folder} was computed for other settings and cannot be used: "
                + "; ".join(differences)
                + f". Use another cache folder, or delete {self.folder} (train option rebuild_cache: true) to recompute it"
            )
        return stored

    def missing(self, examples: Sequence[Sequence[int]]) -> list[int]:
        """Indices of the examples (lists of input_ids) the cache does not hold."""
        return [i for i, ids in enumerate(examples) if example_key(ids) not in self.entries]

    def covers(self, examples: Sequence[Sequence[int]]) -> bool:
        return not self.missing(examples)

    # ------------------------------------------------------------------------------------ consolidate
    def consolidate(self, log: Callable[[str], None] = print) -> list[str]:
        """Merge part manifests, verify every shard, drop damaged ones, delete leftovers; rewrite the manifest.

        Call on one process while no build runs (the main rank, between barriers). Every listed
        shard is read once (length, safetensors header, sha256). Returns the files found damaged:
        their rows are missing again and the next :meth:`build` recomputes them.
        """
        if not self.folder.exists():
            return []
        for part in sorted(self.folder.glob(PART_GLOB)):
            stored = self._read_manifest(part)
            self.entries.update(stored["entries"])
            self.shards.update(stored["shards"])
        damaged = []
        for shard, record in sorted(self.shards.items()):
            problem = shard_problem(self.folder / shard, record)
            if problem:
                damaged.append(shard)
                log(f"source-state cache: {self.folder / shard} {problem}; deleting it, its rows will be recomputed")
        self.shards = {k: v for k, v in self.shards.items() if k not in damaged}
        self.entries = {k: v for k, v in self.entries.items() if v in self.shards}
        changed = bool(damaged) or any(self.folder.glob(PART_GLOB)) or not (self.folder / MANIFEST).exists()
        if self.shards or (self.folder / MANIFEST).exists():
            if changed:
                atomic_write_json(self.folder / MANIFEST, self._manifest())
        for path in self.folder.iterdir():  # parts (merged), temporaries and shards no manifest lists
            if path.name != MANIFEST and is_cache_file(path) and path.name not in self.shards:
                path.unlink()
        return damaged

    def _manifest(self, entries: dict | None = None, shards: dict | None = None) -> dict:
        return {"version": VERSION, "fields": asdict(self.fields),
                "entries": self.entries if entries is None else entries,
                "shards": self.shards if shards is None else shards}

    # ----------------------------------------------------------------------------------------- build
    def build(
        self,
        examples: Sequence[Sequence[int]],
        states_fn: StatesFn | None,
        batch_size: int = 8,
        shard_bytes: int = 1 << 30,
        device: str | torch.device = "cpu",
        progress: bool = True,
        rank: int = 0,
        world_size: int = 1,
        rows_fn: Callable[[list[list[int]]], list[torch.Tensor]] | None = None,
    ) -> int:
        """Compute and store the states of the examples the cache lacks; return how many rows this rank stored.

        examples: lists of input_ids (all rows of the run); states_fn: [B, T] ids, [B, T] mask -> [B, T, d_s].
        Batches of ``batch_size`` are formed from all distinct examples sorted by length (right
        padding: no padding reaches a real token through the causal source); a batch holding a
        missing example is computed by rank ``i % world_size``, ``i`` its place among such batches.
        Each rank writes its own shards and ``manifest.part-RANK.json``; :meth:`consolidate` merges them.
        rows_fn: instead of states_fn, a function from a batch of examples to one tensor per example
        (fusion: [S_i, L, d_s], S_i source tokens that need not be as many as the example's ids).
        """
        unique: dict[str, list[int]] = {}
        for ids in examples:
            unique.setdefault(example_key(ids), list(ids))
        order = sorted(unique, key=lambda k: (len(unique[k]), k))
        batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
        batches = [b for b in batches if any(k not in self.entries for k in b)][rank::world_size]
        if not batches:
            return 0
        self.folder.mkdir(parents=True, exist_ok=True)
        dtype = DTYPES[self.fields.dtype]
        part: dict[str, dict] = {"entries": {}, "shards": {}}
        pending: dict[str, torch.Tensor] = {}
        pending_bytes = 0
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(len(b) for b in batches), desc=f"source-state cache (rank {rank})", unit="row",
                   disable=not progress)
        for keys in batches:
            with torch.no_grad():
                states = rows_fn([unique[k] for k in keys]) if rows_fn is not None else \
                    _batch_states(states_fn, [unique[k] for k in keys], device)
            for row, key in enumerate(keys):
                if states[row].shape[-1] != self.fields.hidden_size:
                    raise LLMModulesError(f"the source gave states of width {states[row].shape[-1]}, the cache "
                                          f"expects {self.fields.hidden_size}")
                if key in self.entries:
                    continue
                tensor = states[row].to("cpu", dtype).contiguous()
                pending[key] = tensor
                pending_bytes += tensor.numel() * tensor.element_size()
            if pending_bytes >= shard_bytes:
                self._write_shard(pending, part, rank)
                pending, pending_bytes = {}, 0
            bar.update(len(keys))
        bar.close()
        if pending:
            self._write_shard(pending, part, rank)
        return len(part["entries"])

    def _write_shard(self, tensors: dict[str, torch.Tensor], part: dict, rank: int) -> None:
        """Write one shard atomically, then list it in this rank's part manifest (also atomically)."""
        index = len(part["shards"])
        name = f"states-{rank:03d}-{index:05d}.safetensors"
        while (self.folder / name).exists() or name in self.shards:
            index += 1
            name = f"states-{rank:03d}-{index:05d}.safetensors"
        data = save(tensors, metadata={"fields": json.dumps(asdict(self.fields))})
        atomic_write_bytes(self.folder / name, data)
        part["shards"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        part["entries"].update({key: name for key in tensors})
        atomic_write_json(self.folder / PART.format(rank=rank), self._manifest(part["entries"], part["shards"]))

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
            path = self.folder / shard
            expected = self.shards.get(shard, {}).get("bytes")
            size = path.stat().st_size if path.exists() else None
            if size != expected:
                raise LLMModulesError(f"{path} has {size} bytes, the cache manifest says {expected}: it changed after "
                                      "it was verified; run again to rebuild it")
            try:
                handle = self._handles[shard] = safe_open(str(path), framework="pt")
            except Exception as error:  # noqa: BLE001 - safetensors raises its own error types
                raise LLMModulesError(f"{path} cannot be read as safetensors ({error}); run again to rebuild it") from error
        return handle.get_tensor(key)

    def size_bytes(self) -> int:
        return sum(record["bytes"] for record in self.shards.values())

    def __getstate__(self) -> dict:  # dataloader workers reopen the shards themselves
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state


def _batch_states(states_fn: StatesFn, examples: list[list[int]], device: str | torch.device) -> list[torch.Tensor]:
    """Right-padded [B, T] ids and mask through ``states_fn``; each example's own [T_i, d_s] slice."""
    length = max(len(ids) for ids in examples)
    ids = torch.zeros((len(examples), length), dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        ids[row, : len(example)] = torch.tensor(example)
        mask[row, : len(example)] = 1
    states = states_fn(ids.to(device), mask.to(device))
    return [states[row, : len(example)] for row, example in enumerate(examples)]


def shard_problem(path: Path, record: dict) -> str | None:
    """What is wrong with a shard file, given its manifest record {"bytes", "sha256"}; None when it is whole."""
    if not path.is_file():
        return "is missing"
    if path.stat().st_size != record["bytes"]:
        return f"has {path.stat().st_size} bytes, its manifest says {record['bytes']} (truncated or overwritten)"
    try:
        check_safetensors(path)
    except LLMModulesError as error:
        return f"is damaged ({error.__cause__})"
    if file_sha256(path) != record["sha256"]:
        return "does not match the sha256 its manifest recorded (damaged)"
    return None


def is_cache_file(path: Path) -> bool:
    """Whether a file in a cache folder was written by this module (manifest, part, shard or a temporary)."""
    name = path.name
    return path.is_file() and (name == MANIFEST or fnmatch(name, PART_GLOB) or fnmatch(name, "states-*.safetensors")
                               or is_temporary(path))


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
