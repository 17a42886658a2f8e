"""How a CPU run's host memory is recycled from one step to the next (``trainer.reuse_host_memory``).

glibc's ``malloc`` hands every block above its mmap threshold (128 KiB, rising to at most 32 MiB)
straight to the kernel with ``mmap`` and back with ``munmap`` when freed. A training step allocates
and frees the same large tensors every time (a GPT-2 step on 2 k tokens: the 0.4 GB logits, their
log-softmax and gradient, the 0.15 GB embedding gradient), so each step faults its memory in again
page by page and the kernel zeroes every page first: 0.54–0.63 M page faults and 1.4–5 s of kernel
CPU time per step measured for the 124M shape on 2 cores (docs/performance.md). With
``trainer.reuse_host_memory: true`` megaforge tells glibc to serve every block from its heap and keep
freed memory there (``mallopt(M_MMAP_MAX, 0)`` and a 2 GiB ``M_TRIM_THRESHOLD``; what Intel's CPU
tuning guides get from preloading jemalloc or tcmalloc), and steady-state steps fault no pages.

It is off by default because a heap can fragment: a freed block is reused only by a request that
fits it *with* ``posix_memalign``'s padding, so a large tensor freed while a small block made after
it lives on leaves a hole the next tensor of the same size cannot take, and the heap grows (seen:
``torch.empty(2**26).fill_(1)`` made and freed in a loop grew it by 256 MiB a turn after the second).
Measured on the 124M step over 30 steps (docs/performance.md): megaforge's RSS settled by the third
step and grew by at most 0.15 GiB after it (5.4 GiB unfused, 4.0 GiB with ``model.fused_cross_entropy``),
while Hugging Face's step under the same setting grew its heap by 0.4 GiB every step — whether a heap
settles depends on the program's allocation pattern. The setting is process-wide and stays until the
process exits. Memory freed by the run goes back to the system only from the top of the heap. Other C
libraries are left alone.
"""

from __future__ import annotations

import ctypes
import logging
import platform

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # mallopt parameters (glibc's malloc.h)
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1  # bytes free at the heap's top before glibc gives them back: the largest it takes


def keep_freed_memory() -> bool:
    """Make this process's glibc ``malloc`` serve large blocks from its heap and keep freed memory for
    reuse; False where the C library is not glibc or refuses a setting."""
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def apply_reuse_host_memory(reuse: bool) -> bool:
    """``trainer.reuse_host_memory``: returns whether this process now keeps freed memory."""
    if not reuse:
        return False
    kept = keep_freed_memory()
    logger.info("host memory: freed blocks " + ("kept in glibc's heap for reuse" if kept
                                                else "left to the C library (not glibc): reuse_host_memory ignored"))
    return kept
