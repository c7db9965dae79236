"""What ended sessions freed goes back to the system (server/memory.py)."""

from __future__ import annotations

import platform

import pytest

from avatar_forcing.server.memory import MALLOC_TRIM, release_free_memory


def resident_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


@pytest.mark.skipif(MALLOC_TRIM is None, reason=f"no malloc_trim in this C library ({platform.libc_ver()})")
def test_freed_heap_behind_a_live_allocation_is_returned():
    # 64 KB blocks come from the heap (below malloc's mmap threshold); the last one stays alive, so the freed
    # ones sit below the heap's top and free() alone cannot give them back: the fragmentation a server sees
    # when one session's buffers outlive another's.
    blocks = [bytearray(64 * 1024) for _ in range(3200)]  # 200 MB, touched (zero-filled)
    pinned = bytearray(64 * 1024)
    before = resident_mb()
    del blocks
    held = resident_mb()
    assert held > before - 50, f"free() alone already returned the memory ({before:.0f} -> {held:.0f} MB)"
    assert release_free_memory()
    after = resident_mb()
    assert held - after > 150, f"only {held - after:.0f} MB of 200 MB freed came back ({held:.0f} -> {after:.0f} MB)"
    assert len(pinned) == 64 * 1024
