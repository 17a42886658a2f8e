"""CPU placement (``trainer.num_threads`` / ``trainer.pin_cores`` null): each local rank gets its own
contiguous block of physical cores, one thread per core, pinned when several ranks share the machine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from toolkit.training import cpu_placement
from toolkit.training.cpu_placement import cpu_threads, physical_cores, rank_share


def _fake_sysfs(root: Path, sockets: int, cores: int, smt: int) -> list[int]:
    """sysfs topology of ``sockets`` × ``cores`` × ``smt`` CPUs numbered as Linux does on x86 (all first
    threads of every core, then their siblings): CPU n is core n mod (sockets·cores)."""
    physical = sockets * cores
    for cpu in range(physical * smt):
        core = cpu % physical
        d = root / f"cpu{cpu}" / "topology"
        d.mkdir(parents=True)
        (d / "physical_package_id").write_text(f"{core // cores}\n")
        (d / "core_id").write_text(f"{core % cores}\n")
    return list(range(physical * smt))


def test_hyperthread_siblings_stay_with_their_core_and_ranks_get_whole_cores(tmp_path):
    cpus = _fake_sysfs(tmp_path, sockets=2, cores=4, smt=2)  # 16 CPUs, 8 cores, siblings n and n+8
    cores = physical_cores(cpus, tmp_path)
    assert cores == [[n, n + 8] for n in range(8)]
    assert rank_share(cores, 0, 2) == [[0, 8], [1, 9], [2, 10], [3, 11]]  # socket 0
    assert rank_share(cores, 1, 2) == [[4, 12], [5, 13], [6, 14], [7, 15]]  # socket 1
    assert rank_share(cores, 2, 3) == [[4, 12], [5, 13]]  # 8 // 3 = 2 each; cores 6, 7 idle
    assert rank_share(cores, 5, 16) == [[5, 13]]  # more ranks than cores: round-robin
    assert rank_share(cores, 13, 16) == [[5, 13]]
    assert physical_cores([0, 1], tmp_path / "missing") == [[0], [1]]  # unreadable topology: a core each


def test_threads_are_the_physical_cores_of_the_share(monkeypatch, tmp_path):
    cpus = _fake_sysfs(tmp_path, sockets=1, cores=16, smt=1)
    monkeypatch.setattr(cpu_placement, "SYSFS_CPU", tmp_path)
    monkeypatch.setattr(cpu_placement, "usable_cpus", lambda: cpus)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert cpu_threads(None, "cpu") == 16
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun --nproc-per-node 4 (it sets OMP_NUM_THREADS=1)
    assert cpu_threads(None, "cpu") == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert cpu_threads(None, "cpu") == 1
    assert cpu_threads(3, "cpu") == 3  # trainer.num_threads wins
    assert cpu_threads(None, "cuda") is None  # GPU runs keep torch's default


PLACE = """
import os, sys, torch
from toolkit.training.cpu_placement import place_cpu_run
threads, pinned = place_cpu_run(None, {pin}, "cpu")
print(threads, pinned, sorted(os.sched_getaffinity(0)), torch.get_num_threads())
"""


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs Linux affinity and 2 usable CPUs")
@pytest.mark.parametrize("pin", ["None", "False"])
def test_each_local_rank_is_pinned_to_its_own_cores(pin):
    """Two ranks as torchrun starts them on this machine, each in a real process: rank r on core r (auto),
    or every core (pin_cores=false); a single process is never pinned unless asked."""
    cpus = sorted(os.sched_getaffinity(0))
    cores = physical_cores(cpus)
    seen = []
    for rank in (0, 1):
        env = dict(os.environ, LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2", PYTHONPATH=str(REPO))
        out = subprocess.run([sys.executable, "-c", PLACE.format(pin=pin)], capture_output=True, text=True,
                             env=env, check=True, cwd=REPO).stdout.split(maxsplit=1)
        seen.append(out[1])
    share = [sorted(c for core in rank_share(cores, r, 2) for c in core) for r in (0, 1)]
    threads = len(cores) // 2
    if pin == "None":
        assert seen == [f"{share[r]} {share[r]} {threads}\n" for r in (0, 1)]
        assert not set(share[0]) & set(share[1])
    else:
        assert seen == [f"None {cpus} {threads}\n"] * 2
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    single = subprocess.run([sys.executable, "-c", PLACE.format(pin="None")], capture_output=True, text=True,
                            env=dict(env, PYTHONPATH=str(REPO)), check=True, cwd=REPO).stdout
    assert single == f"{len(cores)} None {cpus} {len(cores)}\n"
