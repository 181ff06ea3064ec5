"""Keep the server's memory bounded and its garbage collector out of the way.

glibc's malloc raises its mmap threshold each time a large block is freed, up to 32 MiB, after which
request-sized buffers come from heap arenas that rarely shrink: a server that once decoded a few large
requests would keep that memory for good. Fixing the threshold makes every large buffer its own mapping,
returned when freed, and :func:`trim` hands back what the heap keeps free. Elsewhere than glibc both
are no-ops. :func:`freeze_heap` keeps full garbage collections from scanning the long-lived heap.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Blocks of this size or more get their own mapping (glibc's starting value, kept fixed).
MMAP_THRESHOLD = 128 * 1024

_libc: ctypes.CDLL | None = None


def _glibc() -> ctypes.CDLL | None:
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        try:
            lib = ctypes.CDLL(name or "libc.so.6")
            lib.mallopt  # noqa: B018 - only glibc has these
            lib.malloc_trim  # noqa: B018
        except (OSError, AttributeError):
            return None
        _libc = lib
    return _libc


def tune_allocator() -> None:
    """Fix glibc's mmap threshold (see the module docstring); call once at server start."""
    lib = _glibc()
    if lib is not None and not (
        lib.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and lib.mallopt(_M_TRIM_THRESHOLD, 4 * MMAP_THRESHOLD)
    ):
        log.debug("mallopt refused the mmap threshold; large buffers may stay with the process")


def trim() -> None:
    """Return free heap memory to the operating system (glibc's ``malloc_trim``)."""
    lib = _glibc()
    if lib is not None:
        lib.malloc_trim(0)


def freeze_heap() -> None:
    """Move every object alive now out of the cyclic garbage collector's reach (``gc.freeze``).

    A loaded model and the libraries behind it are hundreds of thousands of long-lived objects; each full
    collection would scan them all (about 0.3 s, holding the GIL, so freezing the event loop), and a request
    that allocates many lists or dicts (a nested JSON body) triggers such collections. Call after startup and
    after each model load.
    """
    gc.freeze()
