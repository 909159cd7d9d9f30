"""Handing the memory this process freed back to the system.

Two allocators keep freed memory in the RSS until asked: pyarrow's default pool (mimalloc) keeps
freed buffers for reuse, and glibc's heap keeps its free pages mapped. The refresh job releases
pyarrow's after each step, the server both after a swapped-out version is closed.
"""

from __future__ import annotations

import ctypes
import ctypes.util

import pyarrow as pa

_LIBC = ctypes.CDLL(ctypes.util.find_library("c"))


def release_arrow_memory() -> None:
    """Hands the memory pyarrow's allocator holds free back to the system: GiBs at 10M items (the
    item vectors, the tables frames were read from). In a 10M-item refresh, whether later
    allocations reused them varied from run to run, and the peak RSS with it, by 1.5 GiB with the
    same inputs."""
    pa.default_memory_pool().release_unused()


def release_freed_memory() -> None:
    """pyarrow's free memory, then the free pages of the C heap (glibc's ``malloc_trim``; elsewhere
    nothing): a closed version's models, index and snapshot."""
    release_arrow_memory()
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)
