"""CPU memory allocator settings for training: keep freed memory in the process.

With glibc's default settings, a tensor of more than a few hundred KB is freed back to the kernel
(``munmap``, or a trim of the heap top) and the next one of that size is faulted in again, page by
page: on a 2-core machine that is tens of milliseconds per ResNet-50 step, and varies from step to
step. PyTorch's CPU launcher (``python -m torch.backends.xeon.run_cpu``) preloads jemalloc or
tcmalloc for the same reason. :func:`keep_freed_memory` gets most of that benefit from glibc itself,
through ``mallopt``: allocations up to 32 MB (glibc's largest heap threshold) come from the heap,
and the heap is never trimmed. Peak memory is unchanged; memory freed after the peak stays with the
process.

It changes the allocator of the whole process, so nothing in morph calls it on its own: importing morph
and its library functions leave the allocator alone (``tests/test_core.py`` checks). A training run
calls it when its config says ``run.keep_freed_memory: true`` (the CPU recipe does), and
``benchmarks/bench_core.py`` before timing (both models of a comparison alike). Without touching the
code, glibc reads the same settings from the environment:
``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=2147483647``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 2**20  # HEAP_MAX_SIZE / 2 on 64-bit glibc


def keep_freed_memory() -> bool:
    """Set glibc's mmap threshold to 32 MB and turn off heap trimming; False (and no change) where the C
    library is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
