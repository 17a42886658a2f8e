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


def test_pinning_policy(monkeypatch, tmp_path):
    """Pinned by default only when several ranks share the machine and each can have a core of its own."""
    cpus = _fake_sysfs(tmp_path, sockets=1, cores=4, smt=2)  # 8 CPUs, 4 cores, siblings n and n+4
    monkeypatch.setattr(cpu_placement, "SYSFS_CPU", tmp_path)
    monkeypatch.setattr(cpu_placement, "usable_cpus", lambda: cpus)
    pinned = []
    monkeypatch.setattr(os, "sched_setaffinity", lambda _pid, mask: pinned.append(sorted(mask)), raising=False)
    monkeypatch.setattr(cpu_placement.torch, "set_num_threads", lambda n: None)

    def place(rank: int, world: int, pin=None):
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(world))
        pinned.clear()
        threads, _ = cpu_placement.place_cpu_run(None, pin, "cpu")
        return threads, list(pinned)

    assert place(1, 2) == (2, [[2, 3, 6, 7]])  # cores 2 and 3 with their siblings, a thread per core
    assert place(0, 1) == (4, [])  # one process: every core it was given
    assert place(0, 1, pin=True) == (4, [cpus])
    assert place(1, 2, pin=False) == (2, [])
    assert place(5, 8) == (1, [])  # more ranks than cores: not pinned (measured slower)
    assert place(5, 8, pin=True) == (1, [[1, 5]])  # unless asked: round-robin
    assert place(0, 2, pin=None)[1] and cpu_placement.place_cpu_run(None, None, "cuda") == (None, None)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs Linux affinity and 2 usable CPUs")
def test_a_rank_really_runs_on_its_own_cores():
    """The second of two ranks, as torchrun starts it, in a process of its own on this machine."""
    cpus = sorted(os.sched_getaffinity(0))
    share = sorted(c for core in rank_share(physical_cores(cpus), 1, 2) for c in core)
    code = ("import os, torch; from toolkit.training.cpu_placement import place_cpu_run; "
            "place_cpu_run(None, None, 'cpu'); print(sorted(os.sched_getaffinity(0)), torch.get_num_threads())")
    env = dict(os.environ, LOCAL_RANK="1", LOCAL_WORLD_SIZE="2", PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True,
                         cwd=REPO).stdout
    assert out == f"{share} {len(physical_cores(cpus)) // 2}\n"
    assert set(share) < set(cpus)
