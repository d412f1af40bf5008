"""The allocator setting of pipeline processes: large arrays freed are given back."""

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
