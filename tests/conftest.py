import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Derived files (indexed shipped corpora) go to a per-session cache, never the user's."""
    os.environ.setdefault("MEGAFORGE_CACHE", str(tmp_path_factory.mktemp("megaforge-cache")))
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    yield


def run_cli(*args: str, cwd=None, timeout: int = 600, env=None, isolated: bool = False) -> subprocess.CompletedProcess:
    """``megaforge ARGS``, its output captured. In this process (:func:`cli_main`) unless the test needs a
    process of its own — another working directory, extra environment, or ``isolated=True`` (signals,
    exit paths that end the interpreter) — then ``python -m toolkit ARGS``. A new interpreter costs the
    seconds it takes to import torch and transformers, on every call."""
    if cwd is None and env is None and not isolated:
        return cli_main(*args)
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "toolkit", *args], cwd=cwd or REPO, capture_output=True,
                          text=True, timeout=timeout, env=full_env)


def cli_main(*args: str) -> subprocess.CompletedProcess:
    """``megaforge ARGS`` in this process (``toolkit.cli.main``), stdout and stderr captured, as a
    ``CompletedProcess``. The torch thread count, the global RNG state, the deterministic-kernels flag
    and the log handlers are restored afterwards."""
    import contextlib
    import io
    import logging

    import torch

    from toolkit.cli import main

    out, err, threads = io.StringIO(), io.StringIO(), torch.get_num_threads()
    rng, deterministic = torch.random.get_rng_state(), torch.are_deterministic_algorithms_enabled()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as e:  # argparse
                code = e.code if isinstance(e.code, int) else 2
    finally:
        torch.set_num_threads(threads)
        torch.random.set_rng_state(rng)
        torch.use_deterministic_algorithms(deterministic)
        root = logging.getLogger("toolkit")
        for handler in [h for h in root.handlers if getattr(h, "megaforge_console", False)]:
            root.removeHandler(handler)
    return subprocess.CompletedProcess(["megaforge", *args], code, out.getvalue(), err.getvalue())


@pytest.fixture
def one_thread():
    """Run a test on one torch thread: tiny models gain nothing from threads, and on a shared
    2-core machine OpenMP waits dominate. Use with ``pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def step_losses(run_dir: Path) -> dict[int, float]:
    """step → train loss, from a run's metrics.jsonl."""
    import json

    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs}


def final_weights(run_dir: Path) -> dict:
    """The run's latest checkpoint loaded into a single-process model: name → tensor."""
    from toolkit.checkpoint import load_megaforge_model

    model, _, _ = load_megaforge_model(run_dir)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bitwise_same_run(run: Path, ref: Path) -> None:
    """Identical losses at every step (exact float equality) and identical final weights."""
    import torch

    assert step_losses(run) == step_losses(ref)
    a, b = final_weights(run), final_weights(ref)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
