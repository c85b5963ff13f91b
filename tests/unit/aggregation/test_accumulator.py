import numpy as np
import pytest

from fcp_server.aggregation.accumulator import RoundAccumulator
from fcp_server.aggregation.state import ClientUpdate
from fcp_server.protos import task_builder_pb2
from tests.unit.aggregation import reference_dp
from tests.unit.aggregation.plan_builders import (
    AUC_STATE,
    NUM_THRESHOLDS,
    TRAINABLE_SHAPES,
    constant_update,
    make_plan,
    make_update,
)

DpType = task_builder_pb2.DpAggregator


def test_small_updates_are_summed_unchanged():
    acc = RoundAccumulator(make_plan(clip_norm=10.0))
    acc.add(constant_update(0.1))
    acc.add(constant_update(0.2))
    total = acc.update_sum()
    for t, shape in zip(total, TRAINABLE_SHAPES, strict=True):
        assert t.dtype == np.float64
        np.testing.assert_allclose(t, np.full(shape, 0.3), rtol=1e-6)
    assert (acc.num_updates, acc.clipped_count, acc.num_examples) == (2, 0, 20)


def test_server_clips_whatever_the_device_did():
    acc = RoundAccumulator(make_plan(clip_norm=1.0))
    result = acc.add(constant_update(1e30))
    assert result.clipped
    assert result.l2_norm > 1e30
    # The sum is float32, as TFF's: the clipped norm is C to float32 resolution.
    assert reference_dp.global_l2_norm(acc.update_sum()) == pytest.approx(1.0, rel=1e-6)
    assert acc.clipped_count == 1


def test_non_finite_updates_are_zeroed_and_counted_but_still_records():
    acc = RoundAccumulator(make_plan(clip_norm=1.0))
    bad = (np.full((3, 2), np.nan, np.float32), np.zeros(2, np.float32))
    result = acc.add(make_update(bad))
    acc.add(constant_update(0.1))
    assert result.non_finite and not result.clipped
    assert acc.non_finite_count == 1
    assert acc.num_updates == 2
    np.testing.assert_allclose(acc.update_sum()[1], [0.1, 0.1], rtol=1e-6)


def test_zeroing_by_linf_happens_before_clipping():
    acc = RoundAccumulator(make_plan(clip_norm=1.0, zeroing_norm=100.0))
    result = acc.add(constant_update(101.0))
    acc.add(constant_update(50.0))
    assert result.zeroed and not result.clipped
    assert (acc.zeroed_count, acc.clipped_count, acc.num_updates) == (1, 1, 2)
    assert reference_dp.global_l2_norm(acc.update_sum()) == pytest.approx(1.0, rel=1e-6)


def test_without_dp_there_is_no_clipping_as_tff_unweighted_mean():
    acc = RoundAccumulator(make_plan(dp_type=DpType.UNKNOWN, clip_norm=0.0))
    acc.add(constant_update(1000.0))
    np.testing.assert_allclose(acc.update_sum()[1], [1000.0, 1000.0])
    assert acc.clipped_count == 0


@pytest.mark.parametrize(
    "dp_type", [DpType.ADAPTIVE_GAUSSIAN, DpType.TREE_AGGREGATION, DpType.ADAPTIVE_TREE]
)
def test_adaptive_and_tree_aggregators_are_accepted(dp_type):
    acc = RoundAccumulator(make_plan(dp_type=dp_type, clients_per_round=100))
    acc.add(constant_update(0.01))
    assert acc.num_updates == 1


def test_adaptive_plans_breaking_tffs_noise_rule_fail_before_any_update():
    # z = 1 needs clipped_count_stddev > 0.5, i.e. more than 10 clients with the default.
    with pytest.raises(ValueError, match="clipped_count_stddev"):
        RoundAccumulator(make_plan(dp_type=DpType.ADAPTIVE_GAUSSIAN, clients_per_round=10))


def test_metric_state_is_summed_with_per_device_bounds():
    acc = RoundAccumulator(make_plan())
    acc.add(make_update(constant_update(0.0).trainable, num_examples=10, loss=(1e9, 10.0)))
    acc.add(make_update(constant_update(0.0).trainable, num_examples=4, loss=(-2.0, 4.0)))
    sums = acc.metric_sums()
    # loss total bounded by max_state_per_example (100) x num_examples (10); a RATIO
    # numerator may be negative.
    np.testing.assert_allclose(sums["loss"], [1000.0 - 2.0, 14.0])
    np.testing.assert_allclose(sums["auc"], 2 * np.ravel(AUC_STATE))


def test_negative_and_non_finite_metric_counts_contribute_nothing():
    update = make_update(constant_update(0.0).trainable, num_examples=3)
    metrics = dict(update.metrics)
    # Non-increasing over the thresholds, as real counts are, so that only the element bounds
    # act (metrics.confusion_curve leaves such a curve alone).
    tp = np.array([9, 2, -5, np.nan, 0], np.float32)
    metrics["auc"] = (tp, *update.metrics["auc"][1:])
    assert tp.size == NUM_THRESHOLDS
    acc = RoundAccumulator(make_plan())
    acc.add(ClientUpdate(update.trainable, 3, metrics))
    # 9 -> 3 (max 1 per example x 3 examples), -5 -> 0, NaN -> 0.
    np.testing.assert_allclose(acc.metric_sums()["auc"][:NUM_THRESHOLDS], [3, 2, 0, 0, 0])


def test_shape_and_metric_mismatches_are_rejected():
    acc = RoundAccumulator(make_plan())
    with pytest.raises(ValueError, match="trainable/0"):
        acc.add(make_update((np.zeros((2, 2), np.float32), np.zeros(2, np.float32))))
    with pytest.raises(ValueError, match="1 trainable tensors, the plan has 2"):
        acc.add(make_update((np.zeros((3, 2), np.float32),)))
    with pytest.raises(ValueError, match="metrics"):
        acc.add(make_update(constant_update(0.0).trainable, with_metrics=False))
    assert acc.num_updates == 0


def test_memory_does_not_grow_with_the_number_of_updates():
    acc = RoundAccumulator(make_plan(clip_norm=1.0))

    def held_bytes() -> tuple[int, int]:
        arrays = [*acc.update_sum(), *acc.metric_sums().values()]
        return sum(a.nbytes for a in arrays), len(vars(acc))

    before = held_bytes()
    for i in range(500):
        acc.add(constant_update(float(i)))
    assert held_bytes() == before
    assert acc.num_updates == 500


def test_the_queries_read_the_float32_sum_itself_never_writing_to_it():
    acc = RoundAccumulator(make_plan(clip_norm=10.0))
    acc.add(constant_update(0.1))
    views = acc.update_sum_view()
    for view, copy in zip(views, acc.update_sum(), strict=True):
        assert view.dtype == np.float32  # no float64 copy of the model
        assert not view.flags.writeable
        np.testing.assert_array_equal(view, copy)  # float32 -> float64 is exact
    acc.add(constant_update(0.2))  # the views follow the running sum
    np.testing.assert_array_equal(views[1], acc.update_sum()[1])
