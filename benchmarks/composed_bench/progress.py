"""Progress on stderr, and the stages of a run with the machine load during each."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator

from .load import CpuUsage


def log(message: str) -> None:
    """A timestamped progress line on stderr."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def stage(name: str, load: dict[str, dict]) -> Iterator[None]:
    """Log a stage's start and end, and record the machine load during it in ``load[name]``."""
    usage = CpuUsage()
    log(f"{name} ...")
    yield
    load[name] = usage.summary()
    log(f"{name} done: {load[name]}")
