"""Keep freed tensor memory in the process during CPU training (glibc ``mallopt``).

PyTorch on CPU has no caching allocator: every tensor is a ``malloc`` and every freed tensor a ``free``. glibc
serves blocks above its mmap threshold (128 KiB, rising to at most 32 MiB) with a fresh ``mmap`` and gives them
back with ``munmap`` on free. A training step allocates the same large activations every time (HSTU-large on
ML-1M: [128, 2, 200, 200] attention maps, 40 MB each, several per block), so every step the kernel maps,
page-faults and zeroes them again: about 450,000 page faults a step, a quarter of the process's CPU time spent
in the kernel. Serving every block from the heap and never trimming the heap back to the OS makes the memory of
one step the memory of the next.

Measured on 2 CPU cores (``docs/journal/2026-12-01-cpu-freed-memory-kept.md``): HSTU-large on ML-1M 5,075
-> 7,341 tokens/s, 23.6 M -> 1.2 M page faults an epoch, the same test figures to the last digit (the arithmetic
is untouched). Models whose activations stay under 32 MiB (HSTU and SASRec at d = 50, one head) gain little.

The cost is that a training process keeps its peak heap until it exits (HSTU-large: 4.2 GB peak instead of
2.8), which is what a trainer wants. Processes that only serve never call this. A user who tunes glibc through its own
``MALLOC_*`` environment variables (or preloads another allocator) keeps those: we then leave malloc alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

# mallopt parameters, from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1  # free memory at the top of the heap kept before trimming it back to the OS
M_TOP_PAD = -2  # extra bytes requested each time the heap grows (fewer, larger brk calls)
M_MMAP_MAX = -4  # most blocks served by mmap at once; 0: none, every block comes from the heap

KEEP_BYTES = 2**31 - 1  # mallopt takes an int: the largest value it accepts
TOP_PAD_BYTES = 2**30

_tuned: bool | None = None


def retain_freed_memory(device_type: str = "cpu", *, enabled: bool = True) -> bool:
    """Serve all allocations from the heap and keep freed memory for reuse (Linux/glibc; idempotent).

    The trainers call it with their device's type and the config's ``retain_cpu_memory``: a GPU trainer's
    activations live in CUDA's caching allocator, and there is nothing to keep on the host.
    Returns True when the process's malloc is now tuned, False where it is left alone (training off the CPU,
    ``enabled`` false, not glibc, the user set ``MALLOC_*`` variables or ``LD_PRELOAD``)."""
    global _tuned
    if device_type != "cpu" or not enabled:
        return bool(_tuned)
    if _tuned is not None:
        return _tuned
    _tuned = False
    if not sys.platform.startswith("linux") or any(k.startswith("MALLOC_") or k == "LD_PRELOAD" for k in os.environ):
        return _tuned
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return _tuned
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; all three must take, or the heap would still shrink under the next step
    _tuned = all(mallopt(p, v) == 1 for p, v in ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, KEEP_BYTES), (M_TOP_PAD, TOP_PAD_BYTES)))
    log.debug("glibc malloc %s", "keeps freed memory (no mmap, no trim)" if _tuned else "left as it was")
    return _tuned


__all__ = ["retain_freed_memory"]
