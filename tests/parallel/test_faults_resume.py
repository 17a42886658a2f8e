"""A dead or hung rank ends the whole job quickly with a non-zero exit; a signal on one rank saves on
every rank. (Exact sharded resume under tp2 × dp2 FSDP: test_reshard.py.)"""

from __future__ import annotations

import time
from pathlib import Path

from tests.parallel.helpers import TINY, launch, losses, train_ok

# The bound is parallel.timeout_seconds + 30 s after the fault; the launch adds start-up (two
# processes importing torch and building the model, slow on a loaded 2-core machine) and two steps.
STARTUP = 30


def test_dead_rank_ends_job(tmp_path: Path):
    start = time.monotonic()
    out = launch(tmp_path / "run", 2, *TINY, "trainer.max_steps=50", env={"MEGAFORGE_FAULT_INJECT": "1:2"},
                 timeout=120)
    assert out.returncode != 0
    assert time.monotonic() - start < 60
    assert "rank 1" in out.stdout + out.stderr


def test_hung_rank_ends_job_on_collective_timeout(tmp_path: Path):
    """Rank 1 stops answering (no process exits): rank 0 must fail on parallel.timeout_seconds."""
    start = time.monotonic()
    out = launch(tmp_path / "run", 2, *TINY, "trainer.max_steps=50", "parallel.timeout_seconds=10",
                 env={"MEGAFORGE_FAULT_INJECT": "1:2:hang"}, timeout=120)
    assert out.returncode != 0
    assert time.monotonic() - start < 60
    assert "rank 0 failed" in out.stderr


def test_signal_on_one_rank_saves_on_every_rank(tmp_path: Path):
    """SIGTERM reaches rank 1 only: the ranks agree at the end of the step, save together, exit 75."""
    import json

    run = tmp_path / "run"
    out = launch(run, 2, *TINY, "trainer.max_steps=6", env={"MEGAFORGE_FAULT_INJECT": "1:2:SIGTERM"}, timeout=120)
    assert out.returncode != 0  # torchrun reports its workers' exit code 75 as a failure of its own
    assert "rank 1 received SIGTERM" in out.stderr and "exitcode  : 75" in out.stderr + out.stdout
    step = run / "checkpoints" / "step_3"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_3"
    assert sorted(p.name for p in step.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert json.loads((step / "trainer_state.json").read_text())["layout"] == {"tp": 1, "pp": 1, "dp": 2}
    train_ok(run, 2, *TINY, "trainer.max_steps=6")
    assert len(losses(run)) == 6 and (run / "checkpoints" / "latest").read_text().strip() == "step_6"


def test_rank_death_during_checkpoint_save(tmp_path: Path):
    """Rank 1 dies inside the save of step_2, its shard written and rank 0 waiting: the job ends within
    the timeout, and what was saved before is intact."""
    from toolkit.checkpoint import CheckpointManager

    run, start = tmp_path / "run", time.monotonic()
    out = launch(run, 2, *TINY, "trainer.max_steps=50", "checkpoint.save_interval=1", "parallel.timeout_seconds=20",
                 env={"MEGAFORGE_FAULT_INJECT": "1:2:exit:save"}, timeout=120)
    assert out.returncode != 0 and time.monotonic() - start < 20 + 30 + STARTUP
    assert "rank 1" in out.stdout + out.stderr
    ckpts = CheckpointManager(run / "checkpoints")
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_1"
    assert not (run / "checkpoints" / "step_2").exists() and ckpts.damage(run / "checkpoints" / "step_1") == []


def test_rank_raising_inside_pipeline_schedule(tmp_path: Path):
    """Rank 1 (the last stage) raises inside its forward, mid-schedule: the job ends within the
    timeout, each rank's cause on one line."""
    start = time.monotonic()
    out = launch(tmp_path / "run", 2, *TINY, "parallel.pipeline_model_parallel_size=2", "trainer.max_steps=50",
                 "parallel.timeout_seconds=20", env={"MEGAFORGE_FAULT_INJECT": "1:2:raise:forward"}, timeout=120)
    assert out.returncode != 0 and time.monotonic() - start < 20 + 30 + STARTUP
    assert "megaforge: rank 1 failed: RuntimeError: MEGAFORGE_FAULT_INJECT: injected failure" in out.stderr
    assert "megaforge: rank 0 failed:" in out.stderr
