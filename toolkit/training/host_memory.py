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
from typing import Callable

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


GIB = 2**30


def proc_status_bytes(key: str) -> int | None:
    """A memory field of this process's ``/proc/self/status`` in bytes (``VmRSS``: resident now,
    ``VmHWM``: peak resident); None where ``/proc`` does not say."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def resident_bytes() -> int | None:
    """This process's resident set size (``VmRSS``); None where ``/proc`` does not say."""
    return proc_status_bytes("VmRSS")


class HeapWatch:
    """With ``reuse_host_memory`` on a CPU run: this process's RSS after every step (logged as
    ``host_rss_gib``), and one warning if it grows well past its size after the first steps — the heap
    fragmenting under this run's allocation pattern (measured: megaforge's 124M GPT step settled by step
    3 and grew ≤ 0.15 GiB after; Hugging Face's step under the same setting grew 0.4 GiB every step)."""

    SETTLE_STEPS = 3  # steps of this process for the heap to reach the step's size
    GROWTH = 0.25  # warn above this fraction over the size after SETTLE_STEPS ...
    MIN_GROWTH = 256 * 2**20  # ... and at least this many bytes

    def __init__(self, read: Callable[[], int | None] = resident_bytes):
        self.read, self.steps, self.settled, self.warned = read, 0, None, False

    def after_step(self) -> int | None:
        """Read the RSS after a step (None where it cannot be read); warn once on growth."""
        rss = self.read()
        self.steps += 1
        if rss is None:
            return None
        if self.steps == self.SETTLE_STEPS:
            self.settled = rss
        elif self.settled is not None and not self.warned and \
                rss - self.settled > max(self.GROWTH * self.settled, self.MIN_GROWTH):
            self.warned = True
            logger.warning(f"host memory: RSS {rss / GIB:.2f} GiB after step {self.steps} of this process, up from "
                           f"{self.settled / GIB:.2f} GiB after step {self.SETTLE_STEPS}: with trainer.reuse_host_memory"
                           "=true the heap keeps freed memory and is fragmenting under this run; if host_rss_gib in "
                           "metrics.jsonl keeps rising, stop and run on with trainer.reuse_host_memory=false")
        return rss


def apply_reuse_host_memory(reuse: bool) -> bool:
    """``trainer.reuse_host_memory``: returns whether this process now keeps freed memory."""
    if not reuse:
        return False
    kept = keep_freed_memory()
    logger.info("host memory: freed blocks " + ("kept in glibc's heap for reuse" if kept
                                                else "left to the C library (not glibc): reuse_host_memory ignored"))
    return kept
