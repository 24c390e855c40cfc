"""Crash-safe files: write to a temporary name, fsync, ``os.replace`` onto the final name, fsync the folder.

A process killed at any instant leaves either the old file or the new one, never half of one
(POSIX ``rename`` is atomic within a filesystem). Leftover temporaries are named
``.NAME.tmp-PID`` so that readers and cleaners recognise them. Written by hand: neither the
standard library nor our dependencies offer an fsync-ing atomic write.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import LLMModulesError

TMP_MARK = ".tmp-"


def is_temporary(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a temporary left by a writer of this module (killed before its rename)."""
    name = Path(path).name
    return name.startswith(".") and TMP_MARK in name


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")


def fsync_folder(folder: str | os.PathLike) -> None:
    """Make a rename or a new entry in ``folder`` durable."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_file(path: str | os.PathLike) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old file or the new one."""
    path = Path(path)
    temporary = _temporary(path)
    with temporary.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    fsync_folder(path.parent)


def atomic_write_json(path: str | os.PathLike, value: object) -> None:
    atomic_write_bytes(path, json.dumps(value, indent=1, default=str).encode())


@contextmanager
def atomic_folder_write(folder: str | os.PathLike) -> Iterator[Path]:
    """Yield a scratch folder beside ``folder``; on success move each file it holds into ``folder`` atomically.

    For writers that take a folder (``save_pretrained``): every file in ``folder`` is then either
    its previous version or its complete new version. Subfolders are moved as a whole.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    scratch = _temporary(folder / "save")
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir()
    try:
        yield scratch
        for item in sorted(scratch.iterdir()):
            if item.is_file():
                fsync_file(item)
            destination = folder / item.name
            if item.is_dir() and destination.exists():
                shutil.rmtree(destination)
            os.replace(item, destination)
        fsync_folder(folder)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
