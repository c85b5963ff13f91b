import json
import logging

import pytest

from fcp_server.observability import Counter, Histogram, JsonFormatter, ServerMetrics


def test_counter_renders_prometheus_text_with_escaped_labels():
    c = Counter("fcp_x_total", "Things.", ("population", "result"))
    c.inc('a"b', "OK")
    c.inc('a"b', "OK", amount=2)
    lines = list(c.render())
    assert lines[:2] == ["# HELP fcp_x_total Things.", "# TYPE fcp_x_total counter"]
    assert lines[2] == 'fcp_x_total{population="a\\"b",result="OK"} 3'
    with pytest.raises(ValueError):
        c.inc("only-one-label")
    with pytest.raises(ValueError):
        c.inc("a", "b", amount=-1)


def test_histogram_buckets_are_cumulative():
    h = Histogram("fcp_d_seconds", "Durations.", ("p",), buckets=(1.0, 10.0))
    for value in (0.5, 5.0, 50.0):
        h.observe(value, "x")
    text = "\n".join(h.render())
    assert 'fcp_d_seconds_bucket{p="x",le="1"} 1' in text
    assert 'fcp_d_seconds_bucket{p="x",le="10"} 2' in text
    assert 'fcp_d_seconds_bucket{p="x",le="+Inf"} 3' in text
    assert 'fcp_d_seconds_sum{p="x"} 55.5' in text
    assert 'fcp_d_seconds_count{p="x"} 3' in text


def test_histogram_counts_a_value_on_a_bound_in_that_bucket():
    h = Histogram("fcp_e_seconds", "Durations.", (), buckets=(10.0, 1.0, 5.0))
    for value in (0.0, 1.0, 1.0, 5.0, 5.000001, 10.0, 11.0, -2.0):
        h.observe(value)
    text = "\n".join(h.render())
    assert 'fcp_e_seconds_bucket{le="1"} 4' in text
    assert 'fcp_e_seconds_bucket{le="5"} 5' in text
    assert 'fcp_e_seconds_bucket{le="10"} 7' in text
    assert 'fcp_e_seconds_bucket{le="+Inf"} 8' in text


def test_server_metrics_render_gauges():
    m = ServerMetrics()
    m.checkins.inc("pop", "SUCCESS")
    text = m.render({"fcp_rounds": {('status="COLLECTING"',): 2.0}})
    assert 'fcp_checkins_total{population="pop",result="SUCCESS"} 1' in text
    assert 'fcp_rounds{status="COLLECTING"} 2' in text
    assert text.endswith("\n")


def test_json_log_lines_carry_extra_fields():
    record = logging.makeLogRecord(
        {
            "msg": "round %s done",
            "args": (7,),
            "levelname": "INFO",
            "name": "fcp",
            "population": "digits",
        }
    )
    doc = json.loads(JsonFormatter().format(record))
    assert doc["message"] == "round 7 done"
    assert doc["population"] == "digits"
    assert doc["level"] == "INFO"
