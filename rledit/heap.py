"""Freed CPU memory handed back to the system after each committed edit step.

An edit step's temporaries change size with every batch and round (keys, gradients, the rounds' growing
factors); glibc keeps their freed blocks in its heap, so over thousands of steps the resident set grows while
nothing is held. `malloc_trim` returns them. Where the C library has no `malloc_trim` this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys


@functools.cache
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_heap() -> bool:
    """Return the heap's free blocks to the system; False where that is not possible here."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
