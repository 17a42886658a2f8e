"""``trainer.reuse_host_memory``: with glibc's defaults a large tensor freed and made again is faulted in
page by page every time; kept, a smaller one reuses the freed heap and faults nothing. Measured in
fresh processes (the setting is process-wide)."""

from __future__ import annotations

import json
import logging
import platform
import subprocess
import sys

import pytest

from tests.conftest import run_cli
from toolkit.training.host_memory import HeapWatch, apply_reuse_host_memory

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


def test_heap_watch_warns_once_on_growth_after_the_first_steps(caplog):
    gib = 2**30
    # grows to the step's size over 3 steps (ignored), then flat, then +0.2 GiB (under 25%), then +1.5 GiB
    rss = iter([1 * gib, 2 * gib, 3 * gib, 3 * gib, int(3.2 * gib), int(3.2 * gib), int(4.5 * gib), 5 * gib])
    watch = HeapWatch(read=lambda: next(rss))
    with caplog.at_level(logging.WARNING, logger="toolkit.training.host_memory"):
        seen = [watch.after_step() for _ in range(8)]
    assert seen[-1] == 5 * gib
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "after step 7" in warnings[0] and "3.00 GiB after step 3" in warnings[0], warnings
    assert "trainer.reuse_host_memory=false" in warnings[0]
    assert HeapWatch(read=lambda: None).after_step() is None  # no /proc: nothing read, nothing said


def test_a_cpu_run_with_reuse_logs_its_host_rss(tmp_path):
    # in a process of its own: the setting is process-wide
    out = run_cli("train", "gpt-tiny", "trainer.max_steps=3", "trainer.log_interval=1", "trainer.eval_interval=0",
                  "trainer.reuse_host_memory=true", "trainer.sample_tokens=0", f"trainer.run_dir={tmp_path / 'run'}",
                  isolated=True)
    assert out.returncode == 0, out.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rss = [r["host_rss_gib"] for r in records if "step" in r]
    assert len(rss) == 3 and all(0.1 < v < 20 for v in rss), records
