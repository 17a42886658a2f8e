"""Where a CPU run's threads go: how many intra-op threads each rank runs, and which cores it may use.

``torchrun`` starts every local rank with ``OMP_NUM_THREADS=1`` (all but one core per rank idle)
and leaves them free to migrate over the whole machine; torch's own default, a thread per core in
every rank, oversubscribes the cores. For a CPU run megaforge instead gives each local rank its own
contiguous share of the machine's *physical* cores (hyperthread siblings stay with their core, so two
ranks never share one), pins the rank's threads to it (``os.sched_setaffinity`` before the first
parallel region: the OpenMP workers created later inherit the mask), and runs one intra-op thread per
physical core of the share — what Intel's ``torch.backends.xeon.run_cpu`` launcher does per instance.
Contiguous shares of the kernel's CPU numbering keep a rank inside one socket/NUMA node where the
split allows. ``trainer.num_threads`` and ``trainer.pin_cores`` override either half.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SYSFS_CPU = Path("/sys/devices/system/cpu")


def usable_cpus() -> list[int]:
    """The logical CPUs this process may run on (its affinity mask; every CPU where that is unknown)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def physical_cores(cpus: list[int], sysfs: Path | None = None) -> list[list[int]]:
    """``cpus`` grouped by physical core (socket, core id from sysfs, default :data:`SYSFS_CPU`), in
    order of each core's first CPU; a CPU whose topology cannot be read is a core of its own."""
    sysfs = sysfs or SYSFS_CPU
    cores: dict[tuple, list[int]] = {}
    for cpu in cpus:
        topology = sysfs / f"cpu{cpu}" / "topology"
        try:
            key = (int((topology / "physical_package_id").read_text()), int((topology / "core_id").read_text()))
        except (OSError, ValueError):
            key = ("cpu", cpu)
        cores.setdefault(key, []).append(cpu)
    return sorted(cores.values(), key=lambda group: group[0])


def rank_share(cores: list[list[int]], local_rank: int, local_world: int) -> list[list[int]]:
    """Local rank ``local_rank``'s contiguous share of ``cores`` (physical cores, each a list of its
    CPUs): an equal block each, the remainder left idle; with more ranks than cores, core
    ``local_rank mod cores`` (ranks then share cores round-robin)."""
    per_rank = len(cores) // local_world
    if per_rank == 0:
        return [cores[local_rank % len(cores)]]
    return cores[local_rank * per_rank:(local_rank + 1) * per_rank]


def cpu_threads(asked: int | None, device: str, cores: list[list[int]] | None = None) -> int | None:
    """Intra-op threads for this process: ``trainer.num_threads`` if given; for a CPU run otherwise the
    physical cores of this rank's share (:func:`rank_share`) of ``cores`` (default: the usable ones);
    None leaves torch's default (GPU runs)."""
    if asked:
        return asked
    if _on_gpu(device):
        return None
    local_rank, local_world = _local_ranks()
    return len(rank_share(cores or physical_cores(usable_cpus()), local_rank, local_world))


def place_cpu_run(num_threads: int | None, pin_cores: bool | None, device: str) -> tuple[int | None, list[int] | None]:
    """Set this process's intra-op threads and, for a CPU run, its core affinity: (threads set or None,
    CPUs pinned to or None). ``pin_cores`` None pins when several ranks share this machine
    (``LOCAL_WORLD_SIZE`` > 1) and each can have a core of its own; a single process keeps every core
    it was given, and so do ranks outnumbering the cores (pinned round-robin, a rank waiting on a
    collective would hold its core while another rank's core is busy: measured slower)."""
    local_rank, local_world = _local_ranks()
    cores = physical_cores(usable_cpus())  # the cores given, before pinning narrows them
    threads = cpu_threads(num_threads, device, cores)
    pinned = None
    auto = pin_cores is None and 1 < local_world <= len(cores)
    if not _on_gpu(device) and (pin_cores or auto) and hasattr(os, "sched_setaffinity"):
        share = rank_share(cores, local_rank, local_world)
        pinned = sorted(cpu for core in share for cpu in core)
        os.sched_setaffinity(0, pinned)
    if threads:
        torch.set_num_threads(threads)
    if pinned is not None or threads:
        logger.debug(f"local rank {local_rank}/{local_world}: {threads or torch.get_num_threads()} threads"
                     + (f", pinned to CPUs {pinned}" if pinned is not None else ""))
    return threads, pinned


def _on_gpu(device: str) -> bool:
    return device == "cuda" or (device == "auto" and torch.cuda.is_available())


def _local_ranks() -> tuple[int, int]:
    """(local rank, ranks on this machine) as torchrun sets them; (0, 1) in a single process."""
    return int(os.environ.get("LOCAL_RANK", "0")), max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
