"""Returning freed heap to the OS, so that the resident size of a process is what it holds."""
from __future__ import annotations

import ctypes


def release_freed_memory() -> None:
    """Hands freed heap back to the OS. glibc keeps freed blocks for reuse: packing a 1.7B model layer by layer
    leaves ~0.3 GB of them, an image encoding ~0.1 GB, resident and counted in RSS though never used again."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
