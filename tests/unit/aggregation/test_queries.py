import numpy as np
import pytest

from fcp_server.aggregation import queries
from fcp_server.protos import plan_pb2, task_builder_pb2

DpType = task_builder_pb2.DpAggregator


def _spec(dp_type: int, **kwargs: float) -> plan_pb2.AggregationSpec:
    spec = plan_pb2.AggregationSpec(**kwargs)  # type: ignore[arg-type]
    spec.dp_type = dp_type  # type: ignore[assignment]
    return spec


def test_unknown_type_is_the_plain_mean_without_clipping():
    query = queries.make_query(_spec(DpType.UNKNOWN))
    assert isinstance(query, queries.UnweightedMeanQuery)
    assert query.record_clip() is None
    result = query.finalize((np.array([6.0, 3.0]),), 3, np.random.default_rng(0))
    np.testing.assert_allclose(result.mean[0], [2.0, 1.0])
    assert result.metrics["dp/noise_stddev"] == 0.0
    assert result.state == {}


def test_fixed_gaussian_divides_by_the_fixed_denominator():
    spec = _spec(DpType.FIXED_GAUSSIAN, noise_multiplier=0.0, clip_norm=2.0, clients_per_round=10)
    query = queries.make_query(spec)
    assert query.record_clip() == 2.0
    result = query.finalize((np.array([5.0]),), 3, np.random.default_rng(0))
    # Not 5 / 3: the denominator is clients_per_round whatever arrived.
    np.testing.assert_allclose(result.mean[0], [0.5])


def test_fixed_gaussian_reports_the_noise_std_on_the_mean():
    spec = _spec(DpType.FIXED_GAUSSIAN, noise_multiplier=1.5, clip_norm=0.4, clients_per_round=8)
    result = queries.make_query(spec).finalize((np.zeros(4),), 8, np.random.default_rng(0))
    assert result.metrics["dp/noise_stddev"] == pytest.approx(1.5 * 0.4 / 8)
    assert result.metrics["dp/noise_multiplier"] == 1.5
    assert result.metrics["dp/clip_norm"] == pytest.approx(0.4)
    assert result.metrics["dp/denominator"] == 8.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"noise_multiplier": -1.0, "clip_norm": 1.0, "clients_per_round": 2}, "noise_multiplier"),
        ({"noise_multiplier": 1.0, "clip_norm": 0.0, "clients_per_round": 2}, "clip_norm"),
        ({"noise_multiplier": 1.0, "clip_norm": 1.0, "clients_per_round": 0}, "clients_per_round"),
    ],
)
def test_fixed_gaussian_validates_its_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        queries.make_query(_spec(DpType.FIXED_GAUSSIAN, **kwargs))


@pytest.mark.parametrize(
    ("dp_type", "expected"),
    [
        (DpType.ADAPTIVE_GAUSSIAN, queries.AdaptiveGaussianQuery),
        (DpType.TREE_AGGREGATION, queries.TreeAggregationQuery),
        (DpType.ADAPTIVE_TREE, queries.AdaptiveTreeQuery),
    ],
)
def test_adaptive_and_tree_types_get_their_own_query(dp_type, expected):
    spec = _spec(dp_type, noise_multiplier=1.0, clip_norm=1.0, clients_per_round=100)
    assert isinstance(queries.make_query(spec), expected)


def test_an_unknown_enum_value_is_rejected():
    with pytest.raises(ValueError, match="Unknown DP aggregator"):
        queries.make_query(_spec(99))


def test_finalize_without_records_is_an_error():
    with pytest.raises(ValueError, match="without any update"):
        queries.UnweightedMeanQuery().finalize((np.zeros(1),), 0, np.random.default_rng(0))
    query = queries.FixedGaussianQuery(noise_multiplier=1.0, clip=1.0, clients_per_round=2)
    with pytest.raises(ValueError, match="without any update"):
        query.finalize((np.zeros(1),), 0, np.random.default_rng(0))
