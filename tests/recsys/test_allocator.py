"""The allocator setting of pipeline processes: large arrays freed are given back; within
`reused_heap` a loop's arrays reuse the heap instead."""

import subprocess
import sys

import pytest

CHILD = """
import sys
import numpy as np
from recsys.models.allocator import fix_mmap_threshold

def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

if sys.argv[1] == "fixed":
    assert fix_mmap_threshold()
big = np.ones(20 * 2**20 // 8)  # a block of 20 MiB, freed: glibc's threshold grows to it
del big
before = rss_mib()
arrays = []
for _ in range(100):  # 400 MiB in blocks of 4 MiB, each followed by a small one that stays
    arrays.append((np.ones(4 * 2**20 // 8), np.ones(4096)))
kept = [small for _, small in arrays]
del arrays
print(round(rss_mib() - before))
"""


def _held_after_free(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True
    )
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_freed_arrays_go_back_to_the_system_with_the_threshold_fixed():
    """400 MiB of 4 MiB arrays, freed, each with a small array allocated after it that stays:
    as glibc starts (after a 20 MiB block was freed) the heap keeps them; with the threshold
    fixed each was a memory map of its own and is given back."""
    as_it_starts, fixed = _held_after_free("default"), _held_after_free("fixed")
    assert as_it_starts > 300, as_it_starts
    assert fixed < 50, fixed


REUSE = """
import ctypes, resource, sys
import numpy as np
from recsys.models.allocator import fix_mmap_threshold, reused_heap

class MallInfo2(ctypes.Structure):  # glibc's mallinfo2 (malloc.h): hblks = blocks mapped
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2

def mapped_blocks_of_1_mib():  # is a 1 MiB array a map of its own?
    a = np.ones(2**20 // 8)
    return libc.mallinfo2().hblks

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

def churn():  # a scoring loop's pattern: 1 MiB arrays, written, freed, 100 times
    before = faults()
    for _ in range(100):
        a = np.ones(2**20 // 8)
        del a
    return faults() - before

assert fix_mmap_threshold()
base = libc.mallinfo2().hblks
fixed, fixed_maps = churn(), mapped_blocks_of_1_mib() - base
with reused_heap():
    churn()  # (the heap grows once)
    reused, reused_maps = churn(), mapped_blocks_of_1_mib() - base
    # 50 MiB freed in the middle of the heap (a small array after each stays): kept
    pairs = [(np.ones(2**20 // 8), np.ones(64)) for _ in range(50)]
    small = [s for _, s in pairs]
    del pairs
    before = rss_mib()
given_back = before - rss_mib()
print(fixed, fixed_maps, reused, reused_maps, round(given_back), mapped_blocks_of_1_mib() - base)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_reused_heap_serves_a_loop_from_the_heap_and_restores_the_fixed_threshold():
    """With the threshold fixed each 1 MiB array is a new map, faulted in page by page (256
    faults); within `reused_heap` it comes from the heap and reuses the block freed before it
    (no new faults); on leaving, the heap's free memory is given back, holes in its middle
    included, and the fixed threshold is back (an array is a map of its own again)."""
    out = subprocess.run(
        [sys.executable, "-c", REUSE], capture_output=True, text=True, check=True
    ).stdout.split()
    fixed, fixed_maps, reused, reused_maps, given_back, maps_after = map(int, out)
    assert (fixed_maps, reused_maps, maps_after) == (1, 0, 1)
    assert fixed > 100 * 200, fixed  # ~256 pages an array
    assert reused < 100, reused
    assert given_back > 40, given_back
