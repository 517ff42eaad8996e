"""Run independent jobs (one per trained run, say) in worker processes that share the machine's cores.

Workers are *spawned*, not forked: a process that has run torch or ITK holds thread pools whose locks a forked child
inherits in whatever state they were, and can deadlock on. Each worker gets its share of the cores for torch's
threads, so N workers do not each start one thread per core.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")


def core_share(workers: int) -> int:
    """The cores each of ``workers`` processes may use (at least one)."""
    return max(1, (os.cpu_count() or 1) // workers)


def share_cores(workers: int) -> None:
    """Give this process its share of the machine's cores for torch's intra-op threads."""
    torch.set_num_threads(core_share(workers))


def map_in_processes(function: Callable[[T], R], items: Sequence[T], workers: int) -> list[R]:
    """``[function(item) for item in items]``, ``workers`` items at a time in spawned processes (in this process when
    ``workers`` is 1 or there is one item); results in the order of ``items``. ``function`` and the items must
    pickle (a module-level function)."""
    if workers <= 1 or len(items) <= 1:
        return [function(item) for item in items]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(workers, len(items)), mp_context=context, initializer=share_cores,
                             initargs=(workers,)) as pool:
        return list(pool.map(function, items))
