"""Keep the memory a training step frees for the next step, instead of handing it back to the kernel.

Every step of a CPU training run allocates and frees the same large buffers: the sampling's key/value cache and
packed weights, the update's activations, logits and gradients. glibc's malloc (Linux) serves each block above its
mmap threshold (128 KiB, rising with use to at most 32 MiB) with a fresh ``mmap`` and unmaps it when it is freed, and
trims the top of its heap once 128 KiB or more lie free there. So each step the kernel takes the step's memory back
and gives it again page by page: a minor fault and a zero-filled 4 KiB page each time, 230,000-280,000 faults an update
for the embedded model (benchmarks/NOTES.md, change 18). On a virtual machine that reports freed pages to its host, a page given back is also taken away
from the guest, and the next touch faults on the host as well.

:func:`keep_freed_memory` switches both off through ``mallopt``: no block is served by ``mmap`` and the heap is never
trimmed, so a freed buffer stays in the process and the next step reuses it without a fault. The price is that the
process keeps its high-water mark: peak memory rises by whatever the heap's fragmentation leaves unused.

Measured (benchmarks/NOTES.md, change 18; AMD EPYC family 25 model 1, float32, 2 threads): side by side on
recipes/cpu-dynamic.yaml (``benchmarks/allocator.py``) a step took 13.86 s against 17.36 s with glibc's defaults, with
1.43 M page faults against 4.60 M over 5 steps and the same peak memory; on grpo_vs_trl.py's work the update in a step
fell to its time alone, and peak memory rose 6% (4,299 -> 4,563 MB, benchmarks/RESULTS.md).
``--allocator system`` keeps glibc's defaults. Elsewhere (macOS, musl) there is nothing to do and nothing is done.

Standard library only.
"""

from __future__ import annotations

import ctypes
import sys
from typing import Literal

__all__ = ["ALLOCATORS", "Allocator", "keep_freed_memory", "use_allocator"]

ALLOCATORS = ("keep", "system")
"""keep: freed memory stays in the process for the next step (:func:`keep_freed_memory`); system: the C library's
defaults."""

Allocator = Literal["keep", "system"]  # the config field's type: ALLOCATORS

# mallopt's parameter numbers (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_TRIM_NEVER = 2**31 - 1  # mallopt takes an int: the largest is "more free memory than a heap top ever holds"


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to serve every block from its heap (``M_MMAP_MAX`` = 0) and never to trim the heap
    (``M_TRIM_THRESHOLD`` = 2**31 - 1), for the rest of the process. Returns whether it took effect: False on a
    C library without ``mallopt`` (not glibc), which is left as it is."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)  # the C library this process already uses
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries without glibc's tunables
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_NEVER))


def use_allocator(allocator: Allocator) -> bool:
    """Apply a config's ``allocator`` (see :data:`ALLOCATORS`); returns whether freed memory is now kept."""
    if allocator not in ALLOCATORS:
        raise ValueError(f"allocator must be one of {ALLOCATORS}, got {allocator!r}")
    return keep_freed_memory() if allocator == "keep" else False
