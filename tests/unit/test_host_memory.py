"""``trainer.reuse_host_memory``: with glibc's defaults a large tensor freed and made again is faulted in
page by page every time; kept, a smaller one reuses the freed heap and faults nothing. Measured in
fresh processes (the setting is process-wide)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from toolkit.training.host_memory import apply_reuse_host_memory

PROBE = r"""
import json, resource, sys
import torch
from toolkit.training.host_memory import apply_reuse_host_memory
kept = apply_reuse_host_memory({reuse})
faults = []
for mib in (256, 192):  # the second fits in the first one's place
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.empty(mib * 2**18).fill_(1.0)  # every page touched
    del x
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({{"kept": kept, "faults": faults}}))
"""

PAGES = 192 * 2**20 // 4096  # 4 KiB pages in the second tensor


def _probe(reuse) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE.format(reuse=reuse)], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc")
def test_kept_heap_faults_nothing_on_the_next_tensor_glibc_default_faults_every_page():
    default = _probe(False)
    kept = _probe(True)
    assert default["kept"] is False and kept["kept"] is True
    assert default["faults"][1] > 0.9 * PAGES, default  # mmap'd afresh
    assert kept["faults"][1] < 0.01 * PAGES, kept  # the freed heap is reused


def test_off_by_default_and_false_leaves_the_process_alone():
    from toolkit.config import TrainerConfig

    assert TrainerConfig().reuse_host_memory is False
    assert apply_reuse_host_memory(False) is False
