"""Fleet knobs: validation, straggler tail, version mix, flaky network transport."""

import httpx
import numpy as np
import pytest

from client_sim.knobs import DeviceKnobs, VersionMix, parse_versions
from client_sim.network import FlakyTransport


def test_probabilities_are_validated():
    with pytest.raises(ValueError, match="dropout_rate"):
        DeviceKnobs(dropout_rate=1.5)


def test_defaults_model_a_real_fleet_and_ideal_turns_everything_off():
    d = DeviceKnobs()
    assert 0.06 <= d.dropout_rate <= 0.10
    ideal = DeviceKnobs.ideal()
    assert (
        ideal.dropout_rate
        == ideal.network_error_rate
        == ideal.compute_seconds(np.random.default_rng(0))
        == 0
    )


def test_stragglers_form_a_slow_tail():
    rng = np.random.default_rng(0)
    fast = DeviceKnobs(straggler_rate=0.0)
    slow = DeviceKnobs(straggler_rate=0.2, straggler_factor=10.0)
    base = np.array([fast.compute_seconds(rng) for _ in range(4000)])
    tail = np.array([slow.compute_seconds(rng) for _ in range(4000)])
    assert 15 < np.median(base) < 25
    assert np.mean(tail > 5 * np.median(base)) > 0.12 > np.mean(base > 5 * np.median(base))


def test_version_mix_draws_by_weight():
    mix = parse_versions("100:3,200:1")
    draws = [mix.draw(np.random.default_rng(i)) for i in range(2000)]
    assert 0.7 < draws.count("100") / 2000 < 0.8
    with pytest.raises(ValueError):
        VersionMix((("abc", 1.0),))


def test_flaky_transport_fails_the_configured_share_before_sending():
    sent = []
    inner = httpx.MockTransport(lambda r: sent.append(r) or httpx.Response(200))
    flaky = FlakyTransport(inner, error_rate=0.3, rng=np.random.default_rng(0))
    client = httpx.Client(transport=flaky, base_url="http://x")
    failures = 0
    for _ in range(1000):
        try:
            client.get("/")
        except httpx.ConnectError:
            failures += 1
    assert failures == flaky.injected and 250 < failures < 350
    assert len(sent) == 1000 - failures
