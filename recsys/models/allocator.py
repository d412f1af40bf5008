"""How the C library's allocator gives the arrays of a pipeline step back to the system.

NumPy and SciPy allocate through the C library's ``malloc``. glibc serves a block of at least
its mmap threshold (128 KiB at start) with a memory map of its own, returned to the system as
soon as it is freed; but each time such a block is freed, it raises the threshold to that
block's size (up to 32 MiB). After a step has freed arrays of tens of MiB (a dataset build),
arrays below 32 MiB come from the heap instead, where a freed block in the middle is kept for
reuse, never returned: the heap only grows under the many batches of a few MiB that follow
(candidates, scores). Fixing the threshold keeps every large array in a map of its own.

A map of its own costs CPU where the same sizes come and go many times: each new map is
faulted in page by page and zeroed by the kernel. Scoring batch after batch of users does
exactly that (on the demo model, 150 page faults a user and a quarter of the scoring's CPU
in the kernel), so `reused_heap` lets the blocks of such a loop come from the heap, where each
batch reuses what the one before freed, and gives the heap back when the loop ends.
"""

from __future__ import annotations

import ctypes
import functools
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

#: glibc's ``mallopt`` parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: glibc's initial trim threshold, which a fixed mmap threshold leaves as it is
_DEFAULT_TRIM = 128 * 1024
#: the largest mmap threshold glibc takes on 64-bit systems (``DEFAULT_MMAP_THRESHOLD_MAX``)
MAX_MMAP_THRESHOLD = 32 * 1024 * 1024

_lock = threading.Lock()
_fixed: int | None = None  # the threshold `fix_mmap_threshold` set (None: glibc's own policy)
_depth = 0  # `reused_heap` contexts open


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """glibc, loaded once (None elsewhere)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt  # noqa: B018  (not glibc: AttributeError)
        return libc
    except (OSError, AttributeError):
        return None


def fix_mmap_threshold(nbytes: int = 128 * 1024) -> bool:
    """Serve every allocation of at least `nbytes` with a memory map of its own, for the rest
    of the process (glibc's ``mallopt(M_MMAP_THRESHOLD, nbytes)``, which also turns off the
    threshold's growth). True where it was set; False on other C libraries (macOS, musl),
    which keep their own policy: only the peak differs there.

    Measured on the 10M demo events, ``train_models`` alone: 2,538-2,621 MiB peak as glibc
    starts, 2,231 MiB with the threshold fixed (the code of 6712069); CPU time within the
    runs' spread."""
    global _fixed
    libc = _libc()
    if libc is None or not libc.mallopt(_M_MMAP_THRESHOLD, int(nbytes)):
        return False
    with _lock:
        _fixed = int(nbytes)
    return True


@contextmanager
def reused_heap(nbytes: int = MAX_MMAP_THRESHOLD) -> Iterator[None]:
    """Within: blocks below `nbytes` (at most `MAX_MMAP_THRESHOLD`) come from the heap, and a
    block freed is reused by the next of its size instead of a new memory map faulted in;
    the heap is kept up to twice `nbytes` above its top. On leaving the last such context the
    threshold `fix_mmap_threshold` set is restored and the free heap memory is given back
    (``malloc_trim``). Nothing changes in a process whose threshold was never fixed (glibc's
    own policy already reuses the heap) or on another C library. For loops that allocate the
    same sizes over and over (scoring batches); any thread may enter it."""
    global _depth
    libc = _libc()
    threshold = min(int(nbytes), MAX_MMAP_THRESHOLD)
    with _lock:
        _depth += 1
        if _depth == 1 and _fixed is not None and libc is not None:
            libc.mallopt(_M_MMAP_THRESHOLD, threshold)
            libc.mallopt(_M_TRIM_THRESHOLD, 2 * threshold)
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _fixed is not None and libc is not None:
                libc.mallopt(_M_MMAP_THRESHOLD, _fixed)
                libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM)
                libc.malloc_trim(0)
