"""Staged round outputs: exact round trip, damage detection, and first-stager-wins."""

import math

import pytest

from fcp_server.services import round_outputs
from fcp_server.services.round_outputs import Outputs, StagedOutputsCorrupt

TRAINING = Outputs(
    server_checkpoint=b"server-state",
    client_checkpoint=b"weights",
    metrics={"server/aggregator/num_clients": 3.0, "loss": float("nan")},
    budget_exhausted=True,
    epsilon=1.25,
)
EVALUATION = Outputs(None, None, {"eval/accuracy": 0.5}, budget_exhausted=False, epsilon=None)


@pytest.mark.parametrize("outputs", [TRAINING, EVALUATION], ids=["training", "evaluation"])
def test_staged_outputs_round_trip_exactly(outputs):
    decoded = round_outputs.decode(round_outputs.encode(outputs))
    assert decoded.server_checkpoint == outputs.server_checkpoint
    assert decoded.client_checkpoint == outputs.client_checkpoint
    assert decoded.budget_exhausted == outputs.budget_exhausted
    assert decoded.epsilon == outputs.epsilon
    assert decoded.metrics.keys() == outputs.metrics.keys()
    for key, value in outputs.metrics.items():
        assert decoded.metrics[key] == value or (
            math.isnan(value) and math.isnan(decoded.metrics[key])
        )


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[:-1],  # truncated checkpoint bytes
        lambda b: b + b"x",  # trailing bytes
        lambda b: b[:6],  # cut inside the prefix
        lambda b: b"XXXX" + b[4:],  # wrong magic
        lambda b: b[:10] + b"{" + b[11:],  # broken JSON header
    ],
)
def test_damaged_staged_outputs_are_refused(damage):
    with pytest.raises(StagedOutputsCorrupt):
        round_outputs.decode(damage(round_outputs.encode(TRAINING)))


def test_the_first_staged_outputs_win(blob_store):
    # Arrange: a first close staged its (noised) result.
    name = "pop/1/1/s/0/staged_outputs"
    first = round_outputs.stage_once(blob_store, name, TRAINING)
    rerun = Outputs(b"other-noise", b"other-weights", {}, budget_exhausted=False, epsilon=2.0)

    # Act: a re-run of the close computed a differently noised result.
    staged = round_outputs.stage_once(blob_store, name, rerun)

    # Assert: it publishes the first result, byte for byte.
    assert first is TRAINING
    assert staged.server_checkpoint == b"server-state"
    assert staged.client_checkpoint == b"weights"
    assert round_outputs.load_staged(blob_store, name) == staged
    assert round_outputs.load_staged(blob_store, "pop/1/2/s/0/staged_outputs") is None
