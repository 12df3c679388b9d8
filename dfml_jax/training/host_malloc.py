"""Keep XLA:CPU's large buffers in the heap instead of fresh ``mmap`` pages every call.

glibc's ``malloc`` serves every allocation above its mmap threshold (at most 32 MiB) with a new
``mmap`` and returns it with ``munmap`` when freed, so each call of a compiled step that
allocates a large temporary touches fresh pages again: a page fault per 4 KiB. On the 2-core
machine this project is developed on, an elementwise pass over a 39 MB array took 12.7 ms that
way and 4.2 ms with the memory kept (``experiments/bench/bench_torch_reference.py`` records the
effect on the hot loops). :func:`reuse_freed_memory` sets ``M_MMAP_MAX = 0`` (large blocks come
from the heap) and a high ``M_TRIM_THRESHOLD`` (freed heap memory is kept for the next call)
through ``mallopt``. It changes where buffers live, never what is computed: results are
bit-identical. The price is a resident size that stays at the process's peak.

The experiment runners call it at start-up (``experiments/*.py``); set
``DFML_JAX_KEEP_MALLOC=1`` to leave the allocator as it is. A process that is not on glibc is
left unchanged.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

__all__ = ["reuse_freed_memory", "OPT_OUT_ENV"]

OPT_OUT_ENV = "DFML_JAX_KEEP_MALLOC"
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's malloc.h
_APPLIED: list[bool] = []


def reuse_freed_memory(trim_threshold: int = 1 << 30) -> bool:
    """Makes glibc keep large freed blocks for reuse (see the module docstring).

    Args:
      trim_threshold: bytes of free heap top kept before memory is returned to the OS.

    Returns:
      True when the allocator was changed (now or by an earlier call), False when not on
      glibc or when ``DFML_JAX_KEEP_MALLOC`` is set.
    """
    if _APPLIED:
        return _APPLIED[0]
    if os.environ.get(OPT_OUT_ENV) or platform.system() != "Linux" \
            or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, int(min(trim_threshold, 2**31 - 1))))
    except (OSError, AttributeError):
        ok = False
    _APPLIED.append(ok)
    return ok
