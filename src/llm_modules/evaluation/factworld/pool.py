"""Fact-world jobs (pretraining a model, training and scoring one method on one seed) in worker processes of
one thread each.

Why one thread per job: PyTorch's CPU kernels split their sums across threads, so the same training run gives
other floating-point results with another thread count (measured: a fact-world target after 40 steps differed in
the last bits of its loss with 1 and with 2 threads), and a few hundred steps of training amplify that into
another model. With early stopping on a small validation set, that was enough to move a single-seed headline
by 20 points between machines. A job that always runs on one thread gives the same numbers whatever
``OMP_NUM_THREADS`` says and however many workers share the jobs. The machine's cores are used by
running jobs side by side instead. Tiny models gain little from intra-op threads anyway.

Workers are spawned (not forked: a forked PyTorch process can inherit a thread pool in a bad state) and get
each job's inputs pickled; the fact world's models are a few MB.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@contextmanager
def one_thread() -> Iterator[None]:
    """Run the enclosed PyTorch work on one intra-op thread, then restore the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _worker_init() -> None:
    torch.set_num_threads(1)


def run_jobs(
    function: Callable[..., Any],
    jobs: Sequence[tuple],
    workers: int,
    on_done: Callable[[int, Any], None] | None = None,
) -> list[Any]:
    """``[function(*job) for job in jobs]``, computed by up to ``workers`` processes of one thread each (``workers``
    <= 1: in this process, on one thread). ``on_done(index, result)`` is called as each job finishes.
    ``function`` must be importable by name (a module-level function)."""
    results: list[Any] = [None] * len(jobs)
    if workers <= 1 or len(jobs) <= 1:
        with one_thread():
            for index, job in enumerate(jobs):
                results[index] = function(*job)
                if on_done is not None:
                    on_done(index, results[index])
        return results
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=context, initializer=_worker_init) as pool:
        futures = {pool.submit(function, *job): index for index, job in enumerate(jobs)}
        for future in as_completed(futures):
            index = futures[future]
            results[index] = future.result()
            if on_done is not None:
                on_done(index, results[index])
    return results


__all__ = ["available_cores", "one_thread", "run_jobs"]
