"""Smoke test of the benchmark suite: `--quick` for the benchmarks that need no TensorFlow.

Runs the real command in a process session of its own (its servers and load generators are
ended with it) and checks that the JSON file holds every figure with both absolute numbers
and the ratio. No timing is asserted: the figures are measurements, not pass/fail checks.
"""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

ROOT = Path(__file__).resolve().parents[2]
# Figures each benchmark reports in --quick mode.
EXPECTED = {"B1": 1, "B3": 3, "B4": 3, "B5": 1, "B6": 2}


def _run_quick(out: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "tools.benchmarks", "--quick", "--only", ",".join(EXPECTED)]
    proc = subprocess.Popen(
        [*cmd, "--out", str(out)],
        cwd=ROOT,
        env={**os.environ, "FCP_LOG_LEVEL": "WARNING"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, _ = proc.communicate(timeout=850)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout)


def test_quick_run_writes_every_figure(tmp_path):
    # Arrange
    out = tmp_path / "results.json"
    # Act
    done = _run_quick(out)
    # Assert
    assert done.returncode == 0, done.stdout[-4000:]
    body = json.loads(out.read_text())
    assert body["environment"]["quick"] is True
    assert body["environment"]["errors"] == {}
    assert body["environment"]["isolation"] == "one child process per benchmark"
    counts: dict[str, int] = {}
    for figure in body["figures"]:
        counts[figure["benchmark"]] = counts.get(figure["benchmark"], 0) + 1
        for key in ("ours", "baseline", "ratio", "target"):
            assert isinstance(figure[key], float) and math.isfinite(figure[key]), figure
            assert figure[key] > 0, figure
        assert figure["passed"] in (True, False), figure
        assert figure["unit"] and figure["notes"] and figure["baseline_name"], figure
    assert counts == EXPECTED
    for benchmark in EXPECTED:
        assert benchmark in done.stdout  # the printed table has a row per benchmark
