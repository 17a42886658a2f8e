"""The throughput benchmark runs end to end on a tiny shape (it drives the trainer's real step, so a
change to ``Trainer.train_step`` that breaks it shows up here, not on a rented GPU)."""

from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "gpt_throughput.py"


def run_bench(monkeypatch, capsys, *args: str) -> str:
    """The benchmark on a tiny gpt-tiny shape at one thread, fp32 on CPU, + ``args``: what it printed."""
    argv = [str(BENCH), "--recipe", "gpt-tiny", "--heads", "4", "--vocab", "250", "--micro-batch", "2",
            "--precisions", "fp32", "--threads", "1", *args]
    monkeypatch.setattr(sys, "argv", argv)
    threads = torch.get_num_threads()
    try:
        runpy.run_path(str(BENCH), run_name="__main__")
    finally:
        torch.set_num_threads(threads)  # --threads 1 must not slow the rest of the session
    return capsys.readouterr().out


def test_gpt_throughput_prints_both_models_a_ratio_and_profiles(monkeypatch, capsys):
    out = run_bench(monkeypatch, capsys, "--layers", "2", "--hidden", "64", "--seq", "32", "--steps", "1",
                    "--profile", "3", "--rss-trace")
    rows = [line for line in out.splitlines() if line.startswith("| cpu | fp32 | eager |")]
    assert len(rows) == 3, out
    assert "failed" not in out, out
    assert "Hugging Face `GPT2LMHeadModel`" in rows[0] and "megaforge `Trainer.train_step`" in rows[1]
    assert "×**" in rows[2]  # the ratio
    assert "| page faults/step |" in out and all(row.count("|") == 13 for row in rows)  # every row fills every column
    assert out.count("profile of one") == 2 and "aten::" in out
    traces = [line for line in out.splitlines() if line.startswith(("Hugging Face, eager fp32: ", "megaforge, eager fp32: "))]
    assert len(traces) == 2, out  # one RSS (peak) pair per step, the warm-up step included
    assert all(len(re.findall(r"\d+\.\d\d \(\d+\.\d\d\)", line)) == 2 for line in traces), traces


def test_gpt_throughput_interleaved(monkeypatch, capsys):
    out = run_bench(monkeypatch, capsys, "--layers", "1", "--hidden", "32", "--seq", "16", "--steps", "2",
                    "--interleave", "--set", "model.fused_cross_entropy=true")
    rows = [line for line in out.splitlines() if line.startswith("| cpu | fp32 | eager + model.fused_cross_entropy")]
    assert len(rows) == 3 and "failed" not in out and "interleaved with megaforge" in out, out
    assert "n/a" in rows[0] and "×**" in rows[2]
    assert "in a process of its own, malloc's defaults" in out  # Hugging Face's settings are not megaforge's


def test_gpt_throughput_interleaved_failure_is_a_row(monkeypatch, capsys):
    # Hugging Face's model cannot be built (no such activation): its row says why, megaforge's says it was not
    # measured, the ratio is n/a, and the benchmark ends normally instead of with the child's error
    out = run_bench(monkeypatch, capsys, "--layers", "1", "--hidden", "32", "--seq", "16", "--steps", "1",
                    "--interleave", "--hf-activation", "no_such_activation")
    rows = [line for line in out.splitlines() if line.startswith("| cpu | fp32 | eager |")]
    assert len(rows) == 3, out
    assert "failed: KeyError" in rows[0] and "no_such_activation" in rows[0], rows[0]
    assert "failed: not measured: interleaved with the failed Hugging Face step" in rows[1], rows[1]
    assert "| n/a |" in rows[2]
