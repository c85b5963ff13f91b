"""The test-only crash points: spec parsing, pass counting, and every marked point is known."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from fcp_server import fault_points

SERVER = Path(fault_points.__file__).parent


def test_a_spec_arms_points_with_their_pass_counts():
    assert fault_points.parse("upload.after_commit:2, db.commit:15,") == {
        "upload.after_commit": 2,
        "db.commit": 15,
    }
    assert fault_points.parse("") == {}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("upload.after_comit:1", "known point"),
        ("db.commit", "known point"),
        ("db.commit:0", "positive integer"),
        ("db.commit:x", "positive integer"),
        ("db.commit:1,db.commit:2", "armed twice"),
    ],
)
def test_bad_specs_are_refused_with_a_clear_message(spec, message):
    with pytest.raises(ValueError, match=message):
        fault_points.parse(spec)


def test_only_the_armed_pass_fires():
    plan = fault_points.FaultPlan.from_env({fault_points.ENV: "close.after_stage:3"})
    assert plan is not None
    fired = [plan.passed("close.after_stage") for _ in range(4)]
    assert fired == [False, False, True, False]
    assert not plan.passed("close.after_claim")


def test_production_arms_nothing():
    assert fault_points.FaultPlan.from_env({}) is None
    assert not fault_points.armed()  # the test run itself sets no FCP_FAULT_POINT


def test_every_point_the_server_marks_is_a_known_point():
    marked = set()
    for path in SERVER.rglob("*.py"):
        marked |= set(re.findall(r'fault_points\.hit\("([^"]+)"\)', path.read_text()))
    assert marked == fault_points.POINTS


def test_an_armed_point_sigkills_the_process_and_logs_its_name(tmp_path):
    log = tmp_path / "faults"
    code = "from fcp_server import fault_points as f; f.hit('db.commit'); f.hit('db.commit')"
    env = {fault_points.ENV: "db.commit:2", fault_points.LOG_ENV: str(log)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=SERVER.parent, check=False)
    assert proc.returncode == -9  # SIGKILL: no cleanup ran
    assert log.read_text().split()[0] == "db.commit"
