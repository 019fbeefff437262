"""How annify sets up a CPU process: keep freed tensor memory for reuse instead of returning it.

glibc's ``malloc`` serves every block above its mmap threshold (dynamic, at most 32 MiB on 64-bit
Linux) with a fresh ``mmap`` and hands it back to the kernel on ``free``. A CNN's high-resolution
activations at a usual batch are far above that (resnet50 at batch 64: 205 MB for one 256×56×56
map), so every forward pays page faults on first touch of every large output (38 % of resnet50's
forward time at batch 32, measured below). That cost follows activation size, not FLOPs: it makes the early,
high-resolution layers slow per FLOP, which is exactly what an early exit runs. Measured here
(BENCHMARKS.md §18, 1 thread): resnet50's forward at batch 32 runs 1.62× faster with memory kept, and
an early exit's speed-up on resann50 at batch 64 rises from 0.56 to 0.72 of its FLOP cut (0.87 with
channels-last, §15b); training steps at batch 8–64 do not change (0.98–1.01×).

``keep_freed_memory()`` turns that off for the process with two ``mallopt`` calls: no ``mmap`` for
large blocks (``M_MMAP_MAX = 0``), and no returning of the heap's free top to the kernel below
1 GiB (``M_TRIM_THRESHOLD``). Freed tensors stay in the process and the next batch reuses them, as
PyTorch's CUDA caching allocator does on a GPU; jemalloc and tcmalloc (PyTorch's CPU tuning guide)
give the same effect by preloading. The price: the resident size stays at its peak instead of
shrinking between batches (resnet50 at batch 32: 1.44 GiB between calls instead of 1.0 GiB; the
peak itself 6 % higher). The annify commands that compute call it unless ``--cpu-memory release``;
a library user calls it once at start-up.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers, glibc's malloc.h
_M_MMAP_MAX = -4
_TRIM_THRESHOLD = 1 << 30  # bytes of free heap top kept before any is returned to the kernel

_kept = False


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory in the process for reuse (see the module docstring).

    Process-wide and not undone: call it once, before the work. Returns True where it took effect
    (Linux with glibc), False elsewhere (macOS, musl), where nothing is changed.
    """
    global _kept
    if _kept:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    # mallopt returns 1 on success
    _kept = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    return _kept
