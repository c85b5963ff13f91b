"""Heterogeneity and failure knobs of the simulated fleet, with defaults from real fleets.

Defaults follow Bonawitz et al. 2019 ("Towards Federated Learning at Scale: System Design",
arXiv 1902.01046): 6-10% of devices drop out of a round (computation errors, network
failures, eligibility changes), so the server over-selects 130%; about 2% of sessions are
interrupted after training. Compute time is log-normal with a straggler tail. Every knob can
be set to zero to turn the behaviour off. Times are simulated seconds; the fleet multiplies
them by its time-compression factor before sleeping.
"""

from dataclasses import dataclass

import numpy as np

# The version code of a current device runtime (ODP mainline module codes are 9 digits).
LATEST_VERSION_CODE = "999000000"


@dataclass(frozen=True)
class DeviceKnobs:
    """Per-session behaviour probabilities and timing (simulated seconds)."""

    # Probability a device drops out after download, before reporting.
    dropout_rate: float = 0.06
    # Probability a device reports COMPLETED but dies before uploading.
    crash_after_report_rate: float = 0.02
    # Probability any single HTTP request fails with a network error (retried with backoff).
    network_error_rate: float = 0.02
    # Probability a device uploads its update a second time (lost response, retry).
    duplicate_upload_rate: float = 0.01
    # Median on-device compute time of one session.
    compute_median: float = 20.0
    # Log-normal spread of the compute time.
    compute_sigma: float = 0.5
    # Share of stragglers, whose compute time is multiplied by `straggler_factor`.
    straggler_rate: float = 0.05
    straggler_factor: float = 10.0
    # Minimum interval between two sessions of one device (its job schedule).
    checkin_interval: float = 60.0

    def __post_init__(self) -> None:
        for name in (
            "dropout_rate",
            "crash_after_report_rate",
            "network_error_rate",
            "duplicate_upload_rate",
            "straggler_rate",
        ):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1]: {value}")
        for name in ("compute_median", "compute_sigma", "checkin_interval"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0: {getattr(self, name)}")
        if self.straggler_factor < 1:
            raise ValueError(f"straggler_factor must be >= 1: {self.straggler_factor}")

    def compute_seconds(self, rng: np.random.Generator) -> float:
        """Draws one session's compute time: log-normal, times the factor for stragglers."""
        if self.compute_median == 0:
            return 0.0
        t = float(self.compute_median * np.exp(self.compute_sigma * rng.standard_normal()))
        if rng.random() < self.straggler_rate:
            t *= self.straggler_factor
        return t

    @classmethod
    def ideal(cls) -> "DeviceKnobs":
        """A fleet with every failure knob at zero and no compute delay (for exact tests)."""
        return cls(
            dropout_rate=0.0,
            crash_after_report_rate=0.0,
            network_error_rate=0.0,
            duplicate_upload_rate=0.0,
            compute_median=0.0,
            straggler_rate=0.0,
            checkin_interval=1.0,
        )


@dataclass(frozen=True)
class VersionMix:
    """The distribution of client version codes over the fleet."""

    # (version code, weight) pairs; weights need not sum to 1.
    versions: tuple[tuple[str, float], ...] = ((LATEST_VERSION_CODE, 0.95), ("341812000", 0.05))

    def __post_init__(self) -> None:
        if not self.versions:
            raise ValueError("at least one version code is needed")
        for code, weight in self.versions:
            if not code.isdigit() or weight < 0:
                raise ValueError(f"bad version entry {code!r}:{weight}")
        if sum(w for _, w in self.versions) <= 0:
            raise ValueError("version weights must not all be zero")

    def draw(self, rng: np.random.Generator) -> str:
        """Draws one device's version code."""
        weights = np.asarray([w for _, w in self.versions], dtype=np.float64)
        return self.versions[int(rng.choice(len(weights), p=weights / weights.sum()))][0]


def parse_versions(text: str) -> VersionMix:
    """Parses `CODE:WEIGHT,CODE:WEIGHT` (a bare CODE has weight 1).

    Raises:
      ValueError: for malformed entries.
    """
    pairs = []
    for item in text.split(","):
        code, _, weight = item.strip().partition(":")
        try:
            pairs.append((code, float(weight) if weight else 1.0))
        except ValueError as e:
            raise ValueError(f"bad version entry {item!r}") from e
    return VersionMix(tuple(pairs))
