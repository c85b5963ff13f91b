"""Hypothesis fuzz of the upload and report-result calls: refused cleanly, nothing changed.

Every case is aimed at a live world (round 1 COMPLETED, round 2 COLLECTING with assignments in
every state) and must get the status the oracle in `attacks` allows, never a 5xx; a refusal
must be the error document and leave every table row and blob file as it was; an accepted
upload must be counted exactly once; a replay is acknowledged and counted zero times.
"""

import collections

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fcp_server import checkpoints
from fcp_server.app import worker_deps
from fcp_server.protos import task_builder_pb2
from fcp_server.services import blob_paths
from fcp_server.storage.models import (
    Assignment,
    AssignmentStatus,
    Round,
    RoundStatus,
    StatusChange,
)
from fcp_server.worker import Worker
from tests.integration.hostile_input import attacks, live, snapshot
from tests.integration.server import testkit

MAX_UPLOAD_BYTES = 16 * 1024
EXAMPLES_PER_KIND = 15
REPORT_EXAMPLES = 120
FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
# What an accepted upload or report may touch.
_ROUND_STATE = {t.__tablename__ for t in (Assignment, Round, StatusChange)}

pytestmark = pytest.mark.slow  # fuzzing: about a minute per database


class Worlds:
    """Live worlds in fresh populations; one a request changed is replaced before the next."""

    def __init__(self, app) -> None:
        self.app = app
        self.worker = Worker(worker_deps(app.extensions["fcp"]))
        self.opened = 0
        self.other = self._open()
        self.current: live.UploadWorld | None = None

    def _open(self) -> live.UploadWorld:
        self.opened += 1
        return live.open_upload_world(self.app, self.worker, f"hostile-{self.opened}")

    def world(self) -> live.UploadWorld:
        if self.current is None:
            self.current = self._open()
        return self.current

    def spoil(self) -> None:
        self.current = None


@pytest.fixture
def upload_app(make_app):
    return make_app(max_upload_bytes=MAX_UPLOAD_BYTES)


def _assert_error_document(resp) -> None:
    error = resp.get_json()["error"]
    assert error["code"] == resp.status_code and error["status"], error
    assert error["message"].strip(), error


def _assert_counted_once(ctx, blobs, world, sent: bytes, before, after) -> None:
    assert before.changed_tables(after) <= _ROUND_STATE, before.diff(after)
    gradient = blob_paths.gradient_blob(
        world.pop, world.task_id, 2, world.reported.proto.assignment_id
    )
    assert before.changed_blobs(after) == {gradient}, before.diff(after)
    assert blobs.get(gradient) == sent  # (the store may keep it compressed on disk)
    with ctx.database.sessions() as session:
        assignment = session.get(Assignment, world.reported.proto.assignment_id)
        rnd = session.get(Round, assignment.round_pk)
        assert assignment.status == AssignmentStatus.UPLOAD_COMPLETED
        assert (rnd.reported_count, rnd.status) == (2, RoundStatus.AGGREGATING)


@pytest.mark.parametrize("kind", attacks.BODY_KINDS)
def test_hostile_uploads_are_refused_and_change_nothing(upload_app, blobs, kind, capsys):
    # Arrange
    ctx, client, worlds = upload_app.extensions["fcp"], upload_app.test_client(), Worlds(upload_app)
    targets, statuses = collections.Counter(), collections.Counter()

    @settings(FUZZ, max_examples=EXAMPLES_PER_KIND)
    @given(attack=attacks.upload_attacks(kind, MAX_UPLOAD_BYTES))
    def attack_once(attack):
        world = worlds.world()
        headers = {"Content-Type": attack.content_type}
        if attack.content_encoding is not None:
            headers["Content-Encoding"] = attack.content_encoding
        before = snapshot.take(ctx.database, blobs.root)

        resp = client.put(
            world.target_path(attack.target, worlds.other, "upload"),
            data=attack.body,
            headers=headers,
        )

        after = snapshot.take(ctx.database, blobs.root)
        if before.diff(after):  # replaced before any check, so a failure cannot leave it dirty
            worlds.spoil()
        targets[attack.target] += 1
        statuses[resp.status_code] += 1
        expected = attacks.expected_upload(attack, MAX_UPLOAD_BYTES, live.UPLOADED)
        assert resp.status_code in expected, (
            resp.status_code,
            expected,
            resp.get_data()[:300],
            attack,
        )
        if resp.status_code >= 400:
            _assert_error_document(resp)
            assert before.diff(after) == []
        elif attack.target == "uploaded":  # an identical replay: acknowledged, not counted
            assert before.diff(after) == []
        else:
            gzipped = (attack.content_encoding or "").strip().lower() == "gzip"
            sent = attack.decoded if gzipped else attack.body
            _assert_counted_once(ctx, blobs, world, sent, before, after)

    # Act / Assert
    attack_once()
    with capsys.disabled():
        print(
            f"\nupload fuzz [{kind}]: {sum(targets.values())} cases, {worlds.opened} worlds; "
            f"statuses {dict(sorted(statuses.items()))}; targets {dict(sorted(targets.items()))}"
        )
    assert "reported" in targets and len(targets) >= 3  # live and dead assignments attacked


def test_hostile_reports_are_refused_and_change_nothing(app, blobs, capsys):
    # Arrange
    ctx, client, worlds = app.extensions["fcp"], app.test_client(), Worlds(app)
    statuses, answered = collections.Counter(), collections.Counter()

    @settings(FUZZ, max_examples=REPORT_EXAMPLES)
    @given(attack=attacks.report_attacks())
    def attack_once(attack):
        world = worlds.world()
        before = snapshot.take(ctx.database, blobs.root)

        resp = client.put(
            world.target_path(attack.target, worlds.other, "report-result"),
            data=attack.body,
            headers={"Content-Type": attack.content_type},
        )

        after = snapshot.take(ctx.database, blobs.root)
        if before.diff(after):  # replaced before any check, so a failure cannot leave it dirty
            worlds.spoil()
        statuses[resp.status_code] += 1
        answered[attack.target, resp.status_code] += 1
        expected = attacks.expected_report(attack)
        assert resp.status_code in expected, (
            resp.status_code,
            expected,
            resp.get_data()[:300],
            attack,
        )
        if resp.status_code >= 400:
            _assert_error_document(resp)
            assert before.diff(after) == []
        elif attack.target != "assigned":  # reports never move a reported or counted device
            assert before.diff(after) == []
        else:
            assert before.changed_tables(after) <= _ROUND_STATE, before.diff(after)
            assert before.changed_blobs(after) == set()

    # Act / Assert
    attack_once()
    with capsys.disabled():
        print(
            f"\nreport fuzz: {sum(statuses.values())} cases, {worlds.opened} worlds; "
            f"statuses {dict(sorted(statuses.items()))}"
        )
    assert {200, 400, 404, 415} <= set(statuses)
    # Every live assignment state got at least one report the server acted on.
    assert {t for t, status in answered if status == 200} == set(attacks.LIVE_TARGETS)


_HUGE = st.floats(float(np.float32(1e30)), float(np.finfo(np.float32).max), width=32)
_SIGNED_HUGE = _HUGE | _HUGE.map(lambda x: -x)


@pytest.mark.parametrize("dp", [True, False], ids=["dp_clipped", "no_dp"])
def test_huge_accepted_updates_stay_bounded(make_app, blobs, dp, capsys):
    """Huge finite updates are valid uploads; DP clips them, and the model never turns inf."""
    app = make_app()
    worker = Worker(worker_deps(app.extensions["fcp"]))
    api = testkit.Api(app.test_client())
    clip = 1.0
    dp_fields = {
        "dp_type": task_builder_pb2.DpAggregator.FIXED_GAUSSIAN,
        "noise_multiplier": 0.0,
        "clip_norm": clip,
    }
    plan = testkit.server_plan(report_goal=2, learning_rate=1.0, **(dp_fields if dp else {}))
    w0 = np.concatenate([t.reshape(-1) for t in testkit.initial_weights()])
    tried = []

    @settings(FUZZ, max_examples=8)
    @given(values=st.lists(st.lists(_SIGNED_HUGE, min_size=4, max_size=4), min_size=2, max_size=2))
    def round_of_huge_updates(values):
        pop = f"huge-{len(tried)}"
        tried.append(values)
        api.open_training(testkit.training_task(report_goal=2, max_size=3), plan=plan, pop=pop)
        for v in values:
            api.contribute(
                testkit.update_bytes(np.array(v[:3]).reshape(3, 1), np.array(v[3:])), pop=pop
            )

        assert worker.tick().rounds_closed >= 1

        state = checkpoints.decode_server_checkpoint(
            blobs.get(blob_paths.server_checkpoint_blob(pop, 1, 1)), plan
        )
        w1 = np.concatenate([t.reshape(-1) for t in state.weights.trainable])
        assert np.all(np.isfinite(w1))
        if dp:  # the mean of updates clipped to L2 <= C moves the model by at most lr * C
            assert np.linalg.norm(w1.astype(np.float64) - w0) <= clip * (1 + 1e-5)

    round_of_huge_updates()
    with capsys.disabled():
        print(f"\nhuge-norm rounds ({'DP' if dp else 'no DP'}): {len(tried)} cases")
