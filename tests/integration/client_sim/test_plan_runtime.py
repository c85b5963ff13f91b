"""The device runtime executes the task builder's digits plans with the TFLite interpreter."""

import numpy as np
import pytest
from safetensors.numpy import load, save

from client_sim import batching, data_sources, examples, partitioning, plan_runtime

pytestmark = [pytest.mark.tf, pytest.mark.slow]


@pytest.fixture(scope="module")
def device_records():
    rng = np.random.default_rng(3)
    source = data_sources.load_digits_source(rng)
    devices = data_sources.assign_devices(source, 12, partitioning.parse_partition("iid"), rng)
    return devices[0].records("train"), devices[-1].records("eval")


def _with_update(checkpoint: bytes, update: bytes) -> bytes:
    weights, delta = load(checkpoint), load(update)
    return save(
        {k: (v - delta[k]).astype(v.dtype) if k in delta else v for k, v in weights.items()}
    )


def test_training_update_follows_the_plan_contract(digits_plans, device_records):
    plan = digits_plans.training.client_plan
    records, _ = device_records
    out = plan_runtime.run_plan(plan, digits_plans.training.initial_checkpoint, records)
    update = load(out.update)
    for i, spec in enumerate(plan.model.trainable):
        assert update[f"trainable/{i}"].shape == tuple(spec.shape)
    expected = batching.examples_used(len(records), batching.batch_plan(plan.data_spec))
    assert int(update["num_examples"]) == out.num_examples == expected
    assert float(update["metric/loss/1"]) == pytest.approx(expected)
    acc = (
        update["metric/sparse_categorical_accuracy/0"],
        update["metric/sparse_categorical_accuracy/1"],
    )
    assert 0 <= float(acc[0]) <= float(acc[1]) == expected
    assert out.update_norm > 0


def test_local_training_lowers_the_device_loss(digits_plans, device_records):
    train, evaluate = digits_plans.training.client_plan, digits_plans.evaluation.client_plan
    records, _ = device_records
    checkpoint = digits_plans.training.initial_checkpoint
    before = plan_runtime.run_plan(evaluate, checkpoint, records).mean_loss
    for _ in range(3):
        checkpoint = _with_update(
            checkpoint, plan_runtime.run_plan(train, checkpoint, records).update
        )
    after = plan_runtime.run_plan(evaluate, checkpoint, records).mean_loss
    assert after < before - 0.1


def test_update_is_clipped_to_the_local_clip_norm(digits_plans, device_records):
    plan = type(digits_plans.training.client_plan)()
    plan.CopyFrom(digits_plans.training.client_plan)
    plan.local_clip_norm = 0.01
    out = plan_runtime.run_plan(plan, digits_plans.training.initial_checkpoint, device_records[0])
    update = load(out.update)
    norm = np.sqrt(
        sum(np.sum(update[f"trainable/{i}"] ** 2) for i in range(len(plan.model.trainable)))
    )
    assert out.clipped and out.update_norm > 0.01 and norm == pytest.approx(0.01, rel=1e-4)


def test_eval_reports_metrics_only(digits_plans, device_records):
    plan = digits_plans.evaluation.client_plan
    out = plan_runtime.run_plan(plan, digits_plans.training.initial_checkpoint, device_records[1])
    update = load(out.update)
    assert not any(k.startswith("trainable/") for k in update)
    assert int(update["num_examples"]) == len(device_records[1])
    assert float(update["metric/loss/0"]) / float(update["metric/loss/1"]) == pytest.approx(
        out.mean_loss, rel=1e-4
    )


def test_unusable_examples_and_checkpoints_are_refused(digits_plans):
    plan = digits_plans.training.client_plan
    bad = [examples.encode_example({"x": np.zeros(64, np.float32)})]  # no label
    with pytest.raises(plan_runtime.ExampleError, match="'y'"):
        plan_runtime.run_plan(plan, digits_plans.training.initial_checkpoint, bad)
    with pytest.raises(plan_runtime.PlanError, match="checkpoint"):
        plan_runtime.run_plan(plan, b"not a checkpoint", bad)


def test_plans_run_in_parallel_threads_give_the_sequential_results(digits_plans):
    # Session threads run plans inline when a fleet has no compute processes; a TFLite
    # interpreter shared between threads corrupts its buffers (wrong updates or an abort).
    import concurrent.futures

    rng = np.random.default_rng(5)
    source = data_sources.load_digits_source(rng)
    devices = data_sources.assign_devices(source, 8, partitioning.parse_partition("iid"), rng)
    plan = digits_plans.training.client_plan
    checkpoint = digits_plans.training.initial_checkpoint
    jobs = [d.records("train") for d in devices if d.records("train")] * 6
    expected = [plan_runtime.run_plan(plan, checkpoint, r).update for r in jobs]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda r: plan_runtime.run_plan(plan, checkpoint, r).update, jobs))

    assert got == expected
