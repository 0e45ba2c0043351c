"""Keep freed CPU tensors' memory in the process instead of handing it back to the OS.

A prefill step's activations are tens of megabytes each (W1's 3,990-token step makes a
3,990 x 3,072 float32 gate/up output, 49 MB, in each of 30 layers). glibc's malloc serves every
allocation above its mmap threshold (dynamic, at most 32 MB) with a fresh `mmap` and returns it
with `munmap` when freed, so each such tensor page-faults all its pages in again and the kernel
zeroes them: on this project's 2-core machine that was 0.6 s of W1's 3.3 s prefill. vLLM's CPU
guide fixes the same thing by preloading tcmalloc; here two `mallopt` calls do it in-process, no
preload and no extra library: serve everything from the heap (`M_MMAP_MAX` = 0) and never trim it
(`M_TRIM_THRESHOLD` very large), so a freed activation's pages are reused by the next one.

The cost is that the process keeps its peak heap: memory a step used stays resident for the
next, as with any caching allocator (W1 with 8192-token steps: peak RSS 1.36 GB -> 1.55 GB).
Loading is the one large peak that is not needed again (the checkpoint's tensors, and the plain
weights that packing or int8 quantisation replaced), so the model runner hands the free heap back
once after loading (`release_free_heap`, glibc's `malloc_trim`): resident memory after loading
SmolLM2 1.35 -> 1.17 GB in float32, 1.29 -> 0.86 GB with `quantization="int8"`. The KV cache is not affected (it is its own memory map,
`worker/kv_cache.py`). Off with `PAGEDLLM_CPU_MALLOC_TUNING=0`; a no-op where the C library
is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

from pagedllm.logger import init_logger
from pagedllm.utils import env_flag

logger = init_logger(__name__)

CPU_MALLOC_TUNING_ENV = "PAGEDLLM_CPU_MALLOC_TUNING"
# From glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
# The largest value mallopt takes for the trim threshold is the C int maximum.
_NEVER_TRIM = 2**31 - 1


def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
    except OSError:
        return None
    # gnu_get_libc_version exists only in glibc; musl and macOS have mallopt semantics of their own.
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def _tuning_enabled() -> bool:
    return env_flag(CPU_MALLOC_TUNING_ENV, default=True)


@functools.cache
def keep_freed_memory_in_heap() -> bool:
    """Apply the two settings once per process; True when they are in effect."""
    if not _tuning_enabled():
        logger.info("%s=0: glibc malloc keeps its defaults", CPU_MALLOC_TUNING_ENV)
        return False
    libc = _glibc()
    if libc is None:
        logger.debug("not glibc: malloc left as it is")
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    ok = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, _NEVER_TRIM) == 1
    if not ok:
        logger.warning("mallopt refused the settings: large CPU tensors keep page-faulting on every allocation")
    return ok


def release_free_heap() -> bool:
    """Return the heap's free pages to the OS once (glibc `malloc_trim(0)`), whatever the trim
    threshold; True when glibc released something. Off, like the rest, with
    `PAGEDLLM_CPU_MALLOC_TUNING=0` (glibc then trims by itself)."""
    if not _tuning_enabled():
        return False
    libc = _glibc()
    if libc is None or not hasattr(libc, "malloc_trim"):
        return False
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.malloc_trim.restype = ctypes.c_int
    return libc.malloc_trim(0) == 1
