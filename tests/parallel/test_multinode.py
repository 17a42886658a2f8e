"""Two "nodes" on one machine: two ``torchrun --nnodes 2`` launches meet through a c10d rendezvous
(as on a cluster, see docs/parallelism.md) and train like one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO
from tests.parallel.helpers import TINY, _free_port, assert_same_run, train_ok, vocab_pad


def test_two_nodes_pp2_match_single_process(tmp_path: Path):
    """One process per node, the two pipeline stages on different nodes (pp across nodes)."""
    reference = train_ok(tmp_path / "ref", 1, *TINY, vocab_pad(1))
    run = tmp_path / "run"
    endpoint = f"127.0.0.1:{_free_port()}"
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
         "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "mf-2nodes",
         "-m", "toolkit", "train", "gpt-tiny", *TINY, vocab_pad(1), "parallel.pipeline_model_parallel_size=2",
         f"trainer.run_dir={run}"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for node in (0, 1)]
    try:
        outputs = [node.communicate(timeout=300)[0] for node in nodes]
    finally:
        for node in nodes:  # a node left waiting for its peer must not outlive the test
            if node.poll() is None:
                node.kill()
    for node, out in zip(nodes, outputs):
        assert node.returncode == 0, out[-4000:]
    assert "2 processes, layout {'tp': 1, 'pp': 2, 'dp': 1}" in "".join(outputs)
    assert_same_run(run, reference)
