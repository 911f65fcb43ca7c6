"""release_free_memory hands freed heap pages back to the OS (glibc Linux) and keeps live data intact."""

import numpy as np
import psutil
import pytest

from datasel_ray.pipeline.memory import _malloc_trim, release_free_memory


@pytest.mark.skipif(_malloc_trim() is None, reason="needs glibc's malloc_trim")
def test_release_returns_freed_heap_pages_and_keeps_live_arrays():
    proc = psutil.Process()
    # 64 KiB arrays come from the malloc heap (below the mmap threshold); the last one stays alive, so the
    # freed pages below it cannot leave by the heap's own top trimming
    chunks = [np.full(8192, i, dtype=np.float64) for i in range(2048)]  # 128 MiB
    keep = chunks[-1]
    del chunks
    before = proc.memory_info().rss
    release_free_memory()
    after = proc.memory_info().rss
    assert before - after > 64 << 20, (before >> 20, after >> 20)
    assert np.array_equal(keep, np.full(8192, 2047.0))


def test_release_is_safe_to_call_repeatedly():
    data = np.arange(1000)
    for _ in range(3):
        release_free_memory()
    assert int(data.sum()) == 499500
