"""An adversarial device cannot move the pre-noise average by more than clip / report_goal.

Several worlds run side by side in one database (one population each, the same plan and the
same honest devices) through the real HTTP API and round close. Every round close draws its
DP noise from a generator with one fixed seed, so all worlds add the same noise (real noise,
z = 1). Round 1 is honest everywhere; in round 2 one device of each attacked world uploads an
adversarial update where the baseline world's device uploads zeros. The difference between an
attacked world's model and the baseline's is then exactly the difference of their pre-noise
averages, which DP-FedAvg bounds by C / report_goal, C being the clip of round 2 (for the
adaptive types, the clip round 1 chose).
"""

import json

import numpy as np
import pytest

from fcp_server import checkpoints
from fcp_server.aggregation import ClientUpdate
from fcp_server.protos import task_builder_pb2
from fcp_server.services import blob_paths
from fcp_server.services.plan_cache import PlanCache
from fcp_server.services.round_close import Deps
from fcp_server.worker import Worker
from tests.integration.server import testkit

Dp = task_builder_pb2.DpAggregator
GOAL = 3
CLIP = 0.5
ZEROING = 50.0
F32_MAX = float(np.finfo(np.float32).max)
F32_TINY = float(np.finfo(np.float32).smallest_subnormal)
PLANS = {
    Dp.FIXED_GAUSSIAN: {"clip_norm": CLIP},
    Dp.ADAPTIVE_GAUSSIAN: {"init_clip_norm": CLIP, "clipped_count_stddev": 1.0},
    Dp.TREE_AGGREGATION: {"clip_norm": CLIP, "zeroing_norm": ZEROING},
    # A restart after round 1 makes round 2 clip at the estimate round 1 reached.
    Dp.ADAPTIVE_TREE: {
        "init_clip_norm": CLIP,
        "clipped_count_stddev": 1.0,
        "zeroing_norm": ZEROING,
        "restart_warmup": 1,
        "restart_frequency": 2,
    },
}
# Honest updates (delta_w, delta_b): one above the initial clip, so the adaptive clip moves.
HONEST = [(0.05, 0.05), (0.4, 0.6)]
ROUND1 = [*HONEST, (0.1, 0.1)]


def _honest_direction() -> np.ndarray:
    w = np.mean([d for d, _ in HONEST]) * np.ones(3)
    b = np.mean([d for _, d in HONEST])
    v = np.append(w, b)
    return v / np.linalg.norm(v)


# name -> (delta_w [3], delta_b [1]) the adversary uploads in round 2.
ATTACKS = {
    "huge_norm": (np.full(3, 1e30), np.array([1e30])),
    "float32_extremes": (np.array([F32_MAX, -F32_MAX, F32_MAX]), np.array([-F32_MAX])),
    "subnormal": (np.full(3, F32_TINY), np.array([F32_TINY])),
    # Crafted: straight against the honest average, L-inf below any zeroing threshold, L2 80x C.
    "against_honest_mean": tuple(np.split(-40.0 * _honest_direction(), [3])),
}


def _update(delta_w, delta_b) -> bytes:
    w = np.asarray(delta_w, dtype=np.float32).reshape(testkit.W_SHAPE)
    b = np.asarray(delta_b, dtype=np.float32).reshape(testkit.B_SHAPE)
    metrics = {"loss": (np.float32(5.0).reshape(()), np.float32(10.0).reshape(()))}
    return checkpoints.encode_update(
        ClientUpdate(trainable=(w, b), num_examples=10, metrics=metrics)
    )


def _weights(blobs, plan, pop: str, result_id: int) -> np.ndarray:
    data = blobs.get(blob_paths.server_checkpoint_blob(pop, 1, result_id))
    state = checkpoints.decode_server_checkpoint(data, plan)
    return np.concatenate([np.ravel(t).astype(np.float64) for t in state.weights.trainable])


def _metrics(blobs, pop: str, result_id: int) -> dict[str, float]:
    return json.loads(blobs.get(blob_paths.metrics_blob(pop, 1, result_id)))


@pytest.fixture
def seeded_worker(ctx):
    """A worker whose every round close draws the same noise (one fixed seed)."""
    deps = Deps(
        database=ctx.database,
        blobs=ctx.blobs,
        clock=ctx.clock,
        settings=ctx.settings,
        plans=PlanCache(),
        rng_factory=lambda: np.random.default_rng(20240601),
    )
    return Worker(deps)


def _reject_non_finite(api, pop: str) -> testkit.Assignment:
    """The adversary first tries NaN and Inf: refused with 400, nothing counted."""
    a = api.assign(pop)
    _, answer = api.report(a)
    location = answer.upload_instruction.upload_location
    for bad in (float("nan"), float("inf"), -float("inf")):
        resp = api.upload(location, _update([bad, 0.0, 0.0], [0.0]))
        assert resp.status_code == 400, resp.get_data(as_text=True)
        assert "NaN or infinite" in resp.get_json()["error"]["message"]
    return a


def _attacker_upload(api, pop: str, data: bytes, first_try_non_finite: bool) -> None:
    a = _reject_non_finite(api, pop) if first_try_non_finite else api.assign(pop)
    _, answer = api.report(a)
    resp = api.upload(answer.upload_instruction.upload_location, data)
    assert resp.status_code == 204, resp.get_data(as_text=True)


@pytest.mark.parametrize("dp_type", list(PLANS), ids=Dp.Enum.Name)
def test_adversary_moves_the_pre_noise_average_at_most_clip_over_report_goal(
    api, ctx, seeded_worker, dp_type
):
    plan = testkit.server_plan(
        report_goal=GOAL, dp_type=dp_type, noise_multiplier=1.0, num_rounds=3, **PLANS[dp_type]
    )
    worlds = {"baseline": (np.zeros(3), np.zeros(1)), **ATTACKS}
    pops = {name: f"w-{name.replace('_', '-')}" for name in worlds}
    for pop in pops.values():
        api.open_training(testkit.training_task(report_goal=GOAL, rounds=3), plan=plan, pop=pop)

    for pop in pops.values():  # round 1: honest everywhere, identical worlds
        for d_w, d_b in ROUND1:
            api.contribute(testkit.update_bytes(d_w, d_b), pop=pop)
    assert seeded_worker.tick().rounds_closed == len(worlds)

    for i, (name, attack) in enumerate(worlds.items()):  # round 2: the adversary joins
        pop = pops[name]
        for d_w, d_b in HONEST:
            api.contribute(testkit.update_bytes(d_w, d_b), pop=pop)
        _attacker_upload(api, pop, _update(*attack), first_try_non_finite=i == 1)
    assert seeded_worker.tick().rounds_closed == len(worlds)

    blobs = ctx.blobs
    base_pop = pops["baseline"]
    clips = {_metrics(blobs, pop, 2)["server/aggregator/dp/clip_norm"] for pop in pops.values()}
    assert len(clips) == 1  # every world used the same round-2 clip
    clip = clips.pop()
    if dp_type in (Dp.ADAPTIVE_GAUSSIAN, Dp.ADAPTIVE_TREE):
        assert clip != pytest.approx(CLIP)  # the current clip, not the initial one
    else:
        assert clip == pytest.approx(CLIP)
    bound = clip / GOAL
    # Same base model in every world before round 2.
    w1 = _weights(blobs, plan, base_pop, 1)
    for pop in pops.values():
        np.testing.assert_array_equal(_weights(blobs, plan, pop, 1), w1)

    base = _weights(blobs, plan, base_pop, 2)
    for name, attack in ATTACKS.items():
        moved = float(np.linalg.norm(_weights(blobs, plan, pops[name], 2) - base))
        assert moved <= bound * (1 + 1e-5) + 1e-6, (name, moved, bound)
        linf = max(float(np.max(np.abs(np.asarray(a, dtype=np.float32)))) for a in attack)
        zeroed = ZEROING in PLANS[dp_type].values() and linf > ZEROING
        l2 = float(np.linalg.norm(np.concatenate(attack).astype(np.float32).astype(np.float64)))
        if zeroed:
            assert moved == pytest.approx(0.0, abs=1e-6), name
            assert _metrics(blobs, pops[name], 2)["server/aggregator/zeroed_count"] == 1.0
        elif l2 > clip:
            # Clipped to exactly C: the adversary gets its full, and only its, share.
            assert moved == pytest.approx(bound, rel=1e-4), (name, moved, bound)
        else:
            assert moved == pytest.approx(l2 / GOAL, rel=1e-3, abs=1e-6), name
    for pop in pops.values():
        assert _metrics(blobs, pop, 2)["server/aggregator/num_clients"] == GOAL


def test_worlds_differ_only_through_the_adversary(api, ctx, seeded_worker):
    """Control: with the same noise, two honest worlds publish bit-identical models."""
    plan = testkit.server_plan(
        report_goal=GOAL, dp_type=Dp.FIXED_GAUSSIAN, noise_multiplier=1.0, clip_norm=CLIP
    )
    for pop in ("twin-a", "twin-b"):
        api.open_training(testkit.training_task(report_goal=GOAL), plan=plan, pop=pop)
        for d_w, d_b in ROUND1:
            api.contribute(testkit.update_bytes(d_w, d_b), pop=pop)
    assert seeded_worker.tick().rounds_closed == 2
    a = _weights(ctx.blobs, plan, "twin-a", 1)
    np.testing.assert_array_equal(a, _weights(ctx.blobs, plan, "twin-b", 1))
    # ...and the noise is real: the model is not the noiseless DP-FedAvg step.
    clipped = []
    for d_w, d_b in ROUND1:
        v = np.append(np.full(3, d_w), d_b)
        clipped.append(v * min(1.0, CLIP / float(np.linalg.norm(v))))
    w0 = np.concatenate([np.ravel(t) for t in testkit.initial_weights()]).astype(np.float64)
    noiseless = w0 - np.sum(clipped, axis=0) / GOAL
    assert float(np.linalg.norm(a - noiseless)) > 1e-2


def test_the_aggregate_does_not_depend_on_the_upload_order(api, ctx, seeded_worker):
    """The float32 sum is added in content order: the same updates in another order give
    bit-identical models (the twins above only show it for the same order)."""
    plan = testkit.server_plan(
        report_goal=GOAL, dp_type=Dp.FIXED_GAUSSIAN, noise_multiplier=1.0, clip_norm=CLIP
    )
    # Values whose float32 sums round differently in different orders.
    updates = [(0.1, 0.3), (1e-4, 0.7), (0.2, 1e-3)]
    for pop, order in (("order-a", updates), ("order-b", updates[::-1])):
        api.open_training(testkit.training_task(report_goal=GOAL), plan=plan, pop=pop)
        for d_w, d_b in order:
            api.contribute(testkit.update_bytes(d_w, d_b), pop=pop)
    assert seeded_worker.tick().rounds_closed == 2
    np.testing.assert_array_equal(
        _weights(ctx.blobs, plan, "order-a", 1), _weights(ctx.blobs, plan, "order-b", 1)
    )
