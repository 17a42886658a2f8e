"""One output path: the package logs, the CLI's handler prints (stdout below WARNING, stderr from
WARNING; -q/-v; under torchrun only rank 0 prints below WARNING)."""

from __future__ import annotations

import logging

import pytest

from toolkit.cli import build_parser, setup_logging

log = logging.getLogger("toolkit.training.trainer")  # any module logger of the package


@pytest.fixture(autouse=True)
def _restore_logging():
    root = logging.getLogger("toolkit")
    handlers, level, propagate = list(root.handlers), root.level, root.propagate
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    root.propagate = propagate


def test_info_to_stdout_warnings_to_stderr(capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    setup_logging(0)
    setup_logging(0)  # installing twice prints once
    log.debug("hidden")
    log.info("resumed from step_10")
    log.warning("note: no tokenizer")
    out = capsys.readouterr()
    assert out.out == "resumed from step_10\n"
    assert out.err == "note: no tokenizer\n"


def test_quiet_and_verbose(capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    setup_logging(-1)
    log.info("progress")
    log.error("failed")
    out = capsys.readouterr()
    assert out.out == "" and out.err == "failed\n"
    setup_logging(1)
    log.debug("details")
    assert capsys.readouterr().out == "details\n"


def test_other_ranks_print_only_warnings_with_their_rank(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "3")
    setup_logging(1)  # -v does not make other ranks chatty
    log.info("training")
    log.warning("rank failed")
    out = capsys.readouterr()
    assert out.out == "" and out.err == "[rank 3] rank failed\n"


@pytest.mark.parametrize("argv,verbosity", [
    (["train", "gpt-tiny"], None),
    (["-q", "train", "gpt-tiny"], -1),
    (["train", "gpt-tiny", "--quiet"], -1),
    (["convert", "a", "b", "--to", "hf", "-v"], 1),
])
def test_flags_before_or_after_the_command(argv, verbosity):
    args = build_parser().parse_args(argv)
    assert getattr(args, "verbosity", None) == verbosity
