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


def run_cli(*args: str, cwd=None, timeout: int = 600, env=None) -> subprocess.CompletedProcess:
    """Run ``python -m toolkit ARGS`` and capture its output."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "toolkit", *args], cwd=cwd or REPO, capture_output=True,
                          text=True, timeout=timeout, env=full_env)
