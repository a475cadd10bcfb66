"""Keep freed host memory in the process for reuse (glibc malloc), instead of page-faulting it back in every step.

glibc serves each allocation above its mmap threshold (128 KiB at first, raised dynamically up to the size of
the largest block freed so far) with a fresh ``mmap`` and unmaps it on ``free``; memory freed at the top of the
heap beyond the trim threshold goes back to the OS too. A CPU training step allocates and frees the same
activation tensors every step, so a process can end up touching them as new pages every step: thousands of page
faults per step, each a trap and a zeroed page: 5,500-8,600 per quickstart stage-2 bare step on the project's
2-core virtual machine, 3 % of the step when the machine is quiet and several times the step when it is busy
(``benchmarks/host_memory.py``, BENCHMARKS.md "Host memory kept for reuse").

``keep_freed_memory`` fixes the mmap threshold (up to glibc's maximum of 32 MiB on 64-bit systems) and raises
the trim threshold through ``mallopt``, which glibc also reads from the environment as
``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``. Blocks below the threshold then come from the heap and
are reused from step to step; the process's peak memory is unchanged, it just does not hand memory back between
steps. Intel's PyTorch CPU guides reach the same by preloading jemalloc or tcmalloc; this needs no extra library.
Where the C library is not glibc (macOS, Windows, musl) nothing is changed.
"""

from __future__ import annotations

import ctypes
import logging
import platform
import sys
from typing import Optional

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # <malloc.h>
M_MMAP_THRESHOLD = -3
MAX_MMAP_THRESHOLD_MB = 32  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: 4 MiB * sizeof(long)
_MIB = 1 << 20


def _glibc() -> Optional[ctypes.CDLL]:
    """The process's C library if it is glibc, else None."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)  # the symbols already loaded into this process: its own libc
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
        return libc
    except (OSError, AttributeError):
        return None


def keep_freed_memory(mmap_threshold_mb: int = MAX_MMAP_THRESHOLD_MB, trim_threshold_mb: int = 1024) -> bool:
    """Serve allocations below ``mmap_threshold_mb`` MiB from the reusable heap, and keep up to
    ``trim_threshold_mb`` MiB of freed memory at its top; True where applied (glibc), False elsewhere.

    Raises ValueError for a threshold glibc would refuse (mmap: 1-32 MiB; trim: >= 0).
    """
    if not 0 < mmap_threshold_mb <= MAX_MMAP_THRESHOLD_MB:
        raise ValueError(
            f"mmap_threshold_mb={mmap_threshold_mb}: glibc accepts 1 to {MAX_MMAP_THRESHOLD_MB} MiB "
            f"(extras.host_malloc.mmap_threshold_mb; null leaves glibc's default)."
        )
    if trim_threshold_mb < 0 or trim_threshold_mb * _MIB >= 2**31:
        raise ValueError(
            f"trim_threshold_mb={trim_threshold_mb}: use 0 to 2047 MiB (extras.host_malloc.trim_threshold_mb)."
        )
    libc = _glibc()
    if libc is None:
        log.info("Host memory: not glibc, malloc left as it is.")
        return False
    applied = libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold_mb * _MIB) == 1
    applied = libc.mallopt(M_TRIM_THRESHOLD, trim_threshold_mb * _MIB) == 1 and applied
    if not applied:
        log.warning("Host memory: glibc refused mallopt; malloc left at its defaults.")
    return applied
