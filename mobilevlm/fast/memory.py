"""Returning freed heap to the OS, so that the resident size of a process is what it holds."""
from __future__ import annotations

import ctypes
import os


def _glibc(function: str, *args) -> None:
    try:
        getattr(ctypes.CDLL("libc.so.6"), function)(*args)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def release_freed_memory() -> None:
    """Hands freed heap back to the OS. glibc keeps freed blocks for reuse: those left by packing a model layer
    by layer, or by an image encoding, would stay resident and counted in RSS though never used again."""
    _glibc("malloc_trim", 0)


# Allocations from this size up are mmapped and unmapped on free. glibc's default threshold starts at 128 KiB
# but rises to the size of each large block freed (up to 32 MiB), after which prefill and image-encoding buffers
# of a few MB come from the heap and stay resident after use (their cost in peak RSS: docs/notes/speed.md).
# Decode-time buffers stay below it, so decoding pays no page faults for it.
HEAP_RETENTION_LIMIT = 1 << 20
_M_MMAP_THRESHOLD = -3


def limit_heap_retention() -> None:
    """Makes glibc return large freed blocks to the OS at once (process-wide; a no-op elsewhere than glibc).
    MOBILEVLM_KEEP_MALLOC_DEFAULTS=1 leaves the allocator as it is."""
    if os.environ.get("MOBILEVLM_KEEP_MALLOC_DEFAULTS") != "1":
        _glibc("mallopt", _M_MMAP_THRESHOLD, HEAP_RETENTION_LIMIT)
