"""Splits a labelled example pool among simulated devices (IID, label-skewed, natural).

* IID: a random permutation cut into near-equal shards.
* Label skew: for each class, device shares drawn from Dirichlet(alpha) (Hsu et al. 2019,
  "Measuring the Effects of Non-Identical Data Distribution", arXiv 1909.06335); small alpha
  gives each device few classes, large alpha approaches IID.
* Natural: one device per writer/user/file (e.g. TFF's federated EMNIST writers).
Every function returns disjoint index arrays, so no example is held by two devices.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

IndexArray = np.ndarray[Any, np.dtype[np.int64]]

MAX_DEVICES = 1_000_000
# Re-draws allowed to give every device at least `min_size` examples under label skew.
_MAX_DIRICHLET_DRAWS = 100


@dataclass(frozen=True)
class PartitionSpec:
    """A parsed --partition value."""

    # "iid", "dirichlet" or "natural".
    kind: str
    # Dirichlet concentration (only for kind == "dirichlet").
    alpha: float = 0.0


def parse_partition(text: str) -> PartitionSpec:
    """Parses `iid`, `dirichlet:ALPHA` or `natural`.

    Raises:
      ValueError: for an unknown kind or a non-positive / non-finite alpha.
    """
    kind, _, arg = text.partition(":")
    if kind in ("iid", "natural") and not arg:
        return PartitionSpec(kind)
    if kind == "dirichlet":
        try:
            alpha = float(arg)
        except ValueError as e:
            raise ValueError(f"dirichlet needs a number: {text!r}") from e
        if not (np.isfinite(alpha) and alpha > 0):
            raise ValueError(f"dirichlet alpha must be a positive number: {text!r}")
        return PartitionSpec("dirichlet", alpha)
    raise ValueError(f"unknown partition {text!r}; use iid, dirichlet:ALPHA or natural")


def _check_devices(n_examples: int, n_devices: int) -> None:
    if not 0 < n_devices <= MAX_DEVICES:
        raise ValueError(f"number of devices must be in [1, {MAX_DEVICES}]: {n_devices}")
    if n_examples < n_devices:
        raise ValueError(f"{n_examples} examples cannot give each of {n_devices} devices one")


def iid_partition(n_examples: int, n_devices: int, rng: np.random.Generator) -> list[IndexArray]:
    """Shuffles the pool and cuts it into `n_devices` shards whose sizes differ by at most 1."""
    _check_devices(n_examples, n_devices)
    order = rng.permutation(n_examples).astype(np.int64)
    return [np.sort(part) for part in np.array_split(order, n_devices)]


def dirichlet_partition(
    labels: np.ndarray[Any, Any],
    n_devices: int,
    alpha: float,
    rng: np.random.Generator,
    *,
    min_size: int = 1,
) -> list[IndexArray]:
    """Label-skewed split: each class is divided among devices in Dirichlet(alpha) shares.

    Draws again (up to a bound) until every device has at least `min_size` examples.

    Raises:
      ValueError: for bad arguments or when no draw satisfies `min_size`.
    """
    labels = np.asarray(labels)
    _check_devices(labels.size, n_devices)
    if not (np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be positive: {alpha}")
    if min_size * n_devices > labels.size:
        raise ValueError(f"cannot give {n_devices} devices {min_size} examples each")
    classes = np.unique(labels)
    for _ in range(_MAX_DIRICHLET_DRAWS):
        shards: list[list[np.ndarray[Any, Any]]] = [[] for _ in range(n_devices)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(n_devices, alpha))
            cuts = (np.cumsum(shares)[:-1] * idx.size).astype(np.int64)
            for device, part in enumerate(np.split(idx, cuts)):
                shards[device].append(part)
        parts = [np.sort(np.concatenate(s)).astype(np.int64) for s in shards]
        if min(p.size for p in parts) >= min_size:
            return parts
    raise ValueError(
        f"no Dirichlet({alpha}) draw gave all {n_devices} devices >= {min_size} examples; "
        "use fewer devices or a larger alpha"
    )


def natural_partition(groups: Sequence[Any] | np.ndarray[Any, Any]) -> list[IndexArray]:
    """One shard per distinct group id (writer, user, file), in sorted group order."""
    groups = np.asarray(groups)
    if groups.size == 0:
        raise ValueError("natural partitioning needs at least one example")
    keys, inverse = np.unique(groups, return_inverse=True)
    if keys.size > MAX_DEVICES:
        raise ValueError(f"{keys.size} groups exceed {MAX_DEVICES} devices")
    return [np.flatnonzero(inverse == k).astype(np.int64) for k in range(keys.size)]


def partition(
    spec: PartitionSpec,
    labels: np.ndarray[Any, Any],
    n_devices: int,
    rng: np.random.Generator,
    *,
    groups: np.ndarray[Any, Any] | None = None,
) -> list[IndexArray]:
    """Applies a parsed partition spec; `natural` keeps the first `n_devices` groups.

    Raises:
      ValueError: when `natural` is asked for data without group ids, or for bad sizes.
    """
    if spec.kind == "iid":
        return iid_partition(len(labels), n_devices, rng)
    if spec.kind == "dirichlet":
        return dirichlet_partition(labels, n_devices, spec.alpha, rng)
    if groups is None:
        raise ValueError("natural partitioning needs per-writer/per-file data (tfrecord, emnist)")
    parts = natural_partition(groups)
    if n_devices > len(parts):
        raise ValueError(f"{n_devices} devices requested, the data has {len(parts)} writers")
    return parts[:n_devices]
