"""Threads in training and scoring, and the one BLAS thread count they run under.

The heavy parts of a fit or a scoring batch (LightFM's epochs, scipy's sparse products,
numpy's sorts and takes, the tree fit) release the GIL, so Python threads use both cores of a
small machine without the start-up cost of processes (importing the stack, loading models).
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


def in_thread(fn: Callable[..., T], *args: Any) -> Future[T]:
    """``fn(*args)`` started in a thread of its own; ``.result()`` joins it (and re-raises)."""
    pool = ThreadPoolExecutor(1)
    try:
        return pool.submit(fn, *args)
    finally:
        pool.shutdown(wait=False)


def lower_thread_priority(niceness: int = 10) -> None:
    """Lower the calling thread's CPU priority by `niceness` (on Linux a thread has its own
    nice value, and the threads it starts inherit it). Work that is needed only later then
    yields the cores to work that others wait for, and still uses what they leave. A
    scheduling hint: where threads cannot be reniced (other systems) only the timing
    differs."""
    if sys.platform.startswith("linux"):
        tid = threading.get_native_id()
        now = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(now + niceness, 19))


def map_in_threads(fn: Callable[[Any], T], items, workers: int = 2) -> list[T]:
    """``[fn(x) for x in items]``, `workers` items at a time in threads, under one BLAS
    thread (see :func:`single_threaded_blas`); the results keep the order of `items`, so
    they do not depend on `workers`."""
    items = list(items)
    with single_threaded_blas():
        if workers <= 1 or len(items) <= 1:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(fn, items))


def single_threaded_blas():
    """A context with one BLAS thread, entered once around work that runs its own threads.

    OpenBLAS's thread count is process-wide, and a product or factorisation can round
    differently with another count: set once around all the threads, it stays the same for
    every call (where contexts entered and left by each thread, interleaved, could switch it
    while another thread's factorisation runs), so the results do not depend on the threads'
    timing. Our threads already use the cores; BLAS threads on top would only contend.
    """
    import scipy.linalg  # noqa: F401  (EASE's LAPACK: loaded first, so the limit covers it)
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")
