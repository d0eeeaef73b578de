"""Every benchmark in bench/ still runs: ``python bench/<name>.py --quick`` exits 0 and prints its ratio.

Nothing ran the benchmarks, so one broke silently (bench_step_overhead.py met a changed constructor only when
someone next measured). Each benchmark's ``--quick`` mode takes a few small steps through every part of it; this
test runs them all, found by glob so that a new benchmark is covered without a line here. It asserts what a user
of a benchmark needs — it ran to the end and computed the ratio it exists to print — never a timing: timings on
a shared CI machine say little, and bench/ is where they are measured.

bench_inference.py makes vLLM's venv itself (scripts/setup-vllm, which CI runs before the suite): a venv that
cannot be made fails it, as any other error does. bench_gpu.py has no GPU here and says so in its ratio line.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BENCHMARKS = sorted(REPO.glob("bench/bench_*.py"))
# "ratio" and then a figure, or the words that say why there is none (bench_gpu.py without a GPU).
RATIO_LINE = re.compile(r"\bratio\b.*?(\d|not measured)")
# A quick run takes seconds to a minute on a quiet machine (up to ~4.5 min with 2 cores at load 15); the limit only
# stops a hung one. bench_inference.py may first install vLLM's venv (scripts/setup-vllm: ~2.5 min, warm wheel cache).
TIMEOUT_S = {"bench_inference": 900}
DEFAULT_TIMEOUT_S = 600


def test_every_benchmark_is_found():
    """The glob finds the benchmarks (a moved folder would otherwise make the test below run nothing)."""
    assert {path.stem for path in BENCHMARKS} >= {"bench_cold_start", "bench_step_overhead"}


@pytest.mark.parametrize("script", BENCHMARKS, ids=[path.stem for path in BENCHMARKS])
def test_quick_run_exits_0_and_prints_a_ratio(script: Path):
    started = time.monotonic()
    code, out, err = run_quick(script, TIMEOUT_S.get(script.stem, DEFAULT_TIMEOUT_S))
    # The time is reported (pytest -rP shows it), never asserted.
    print(f"{script.name} --quick: exit {code} in {time.monotonic() - started:.1f} s")
    assert code == 0, f"{script.name} --quick exited {code}:\n{out[-3000:]}\n{err[-5000:]}"
    ratios = [line for line in out.splitlines() if RATIO_LINE.search(line)]
    assert ratios, f"{script.name} --quick printed no ratio line:\n{out[-3000:]}"


def run_quick(script: Path, timeout_s: float) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``script --quick``. A run past ``timeout_s`` gets Ctrl-C first, so that its
    ``finally`` blocks stop the servers and Ray it started in sessions of their own (a kill would leave them)."""
    process = subprocess.Popen([sys.executable, str(script), "--quick"], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        out, err = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGINT)
        try:
            out, err = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
        pytest.fail(f"{script.name} --quick still ran after {timeout_s} s:\n{out[-3000:]}\n{err[-3000:]}")
    return process.returncode, out, err
