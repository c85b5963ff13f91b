"""Loads the example pools the simulated fleet is built from and deals them out to devices.

Sources (`--data`):
  * `digits` (default): scikit-learn's bundled 8x8 handwritten digits (1,797 real images from
    the UCI "Optical Recognition of Handwritten Digits" set); features `x` (64 floats scaled
    to [0, 1]) and label `y`. A held-out share of the images goes to held-out eval devices.
  * `tfrecord:DIR`: one TFRecord file of serialized tf.train.Example per device
    (`DIR/*.tfrecord`; `DIR/eval/*.tfrecord` for held-out eval devices).
  * `emnist:DIR`: TFF's federated EMNIST h5 files (`fed_emnist[_digitsonly]_{train,test}.h5`,
    groups `examples/<writer>/{pixels,label}`), one writer per device.
Every device receives only its own records (`DeviceData`), never the pool.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from client_sim import examples, partitioning, tfrecords
from fcp_server.protos import plan_pb2

TRAIN = "train"
EVAL = "eval"
FEATURE_KEY = "x"
LABEL_KEY = "y"
MAX_DEVICES = partitioning.MAX_DEVICES


class DataUnavailable(FileNotFoundError):
    """The requested data source has no files at the given location."""


@dataclass(frozen=True)
class ExamplePool:
    """Serialized examples with their labels and (for natural splits) their writer/file."""

    # One serialized tf.train.Example per example.
    records: tuple[bytes, ...]
    # Integer class label per example (used for label-skewed splits).
    labels: np.ndarray[Any, Any]
    # Writer/file id per example, None when the source has no natural grouping.
    groups: np.ndarray[Any, Any] | None = None


@dataclass(frozen=True)
class SourceData:
    """A source's training pool and its held-out pool for eval devices (if any)."""

    train: ExamplePool
    heldout: ExamplePool | None


@dataclass(frozen=True)
class DeviceData:
    """What one device stores: its own example collections, nothing else."""

    device_id: str
    # Collection name ("train" / "eval") -> that device's serialized examples.
    collections: dict[str, tuple[bytes, ...]]

    def records(self, collection: str) -> tuple[bytes, ...]:
        """The device's records in `collection` (empty when it has none)."""
        return self.collections.get(collection, ())


def load_digits_source(rng: np.random.Generator, heldout_fraction: float = 0.2) -> SourceData:
    """scikit-learn's digits, shuffled and split into a training and a held-out pool."""
    from sklearn.datasets import load_digits

    if not 0 <= heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in [0, 1): {heldout_fraction}")
    bunch = load_digits()
    x = (np.asarray(bunch.data, dtype=np.float32) / 16.0).reshape(-1, 64)
    y = np.asarray(bunch.target, dtype=np.int64)
    order = rng.permutation(y.size)
    n_heldout = round(y.size * heldout_fraction)
    pools = [_encode_pool(x[idx], y[idx]) for idx in (order[n_heldout:], order[:n_heldout])]
    return SourceData(pools[0], pools[1] if n_heldout else None)


def _encode_pool(
    x: np.ndarray[Any, Any], y: np.ndarray[Any, Any], groups: np.ndarray[Any, Any] | None = None
) -> ExamplePool:
    records = tuple(
        examples.encode_example({FEATURE_KEY: xi.ravel(), LABEL_KEY: [int(yi)]})
        for xi, yi in zip(x, y, strict=True)
    )
    return ExamplePool(records, np.asarray(y, dtype=np.int64), groups)


def _label_spec() -> plan_pb2.FeatureSpec:
    return plan_pb2.FeatureSpec(name=LABEL_KEY, dtype="int64", shape=[])


def _tfrecord_pool(files: Sequence[Path]) -> ExamplePool:
    records: list[bytes] = []
    groups: list[int] = []
    for i, path in enumerate(files):
        for record in tfrecords.read_tfrecord(path):
            records.append(record)
            groups.append(i)
    labels = []
    for record in records:
        try:
            labels.append(int(examples.parse_feature(record, _label_spec())))
        except ValueError:
            labels.append(-1)  # No integer label: fine for iid/natural, refused by dirichlet.
    return ExamplePool(tuple(records), np.asarray(labels, np.int64), np.asarray(groups, np.int64))


def load_tfrecord_source(directory: Path) -> SourceData:
    """One device per `*.tfrecord` file in `directory` (held-out devices from `eval/`).

    Raises:
      DataUnavailable: when the directory has no .tfrecord files.
    """
    files = sorted(directory.glob("*.tfrecord"))
    if not files:
        raise DataUnavailable(f"no *.tfrecord files in {directory}")
    eval_files = sorted((directory / EVAL).glob("*.tfrecord"))
    return SourceData(_tfrecord_pool(files), _tfrecord_pool(eval_files) if eval_files else None)


def _emnist_pool(path: Path, max_writers: int) -> ExamplePool:
    import h5py  # type: ignore[import-untyped]

    xs, ys, groups = [], [], []
    with h5py.File(path, "r") as f:
        writers = sorted(f["examples"].keys())[:max_writers]
        for g, writer in enumerate(writers):
            node = f["examples"][writer]
            pixels = np.asarray(node["pixels"], dtype=np.float32)
            xs.append(pixels.reshape(pixels.shape[0], -1))
            ys.append(np.asarray(node["label"], dtype=np.int64).ravel())
            groups.append(np.full(pixels.shape[0], g, dtype=np.int64))
    if not xs:
        raise DataUnavailable(f"{path} has no writers under examples/")
    return _encode_pool(np.concatenate(xs), np.concatenate(ys), np.concatenate(groups))


def load_emnist_source(directory: Path, max_writers: int) -> SourceData:
    """TFF's federated EMNIST from local h5 files (digits-only preferred when both exist).

    Raises:
      DataUnavailable: when no fed_emnist*_train.h5 file is present.
    """
    for stem in ("fed_emnist_digitsonly", "fed_emnist"):
        train = directory / f"{stem}_train.h5"
        if train.exists():
            test = directory / f"{stem}_test.h5"
            heldout = _emnist_pool(test, max_writers) if test.exists() else None
            return SourceData(_emnist_pool(train, max_writers), heldout)
    raise DataUnavailable(f"no fed_emnist*_train.h5 in {directory}")


def load_source(text: str, rng: np.random.Generator, *, max_writers: int) -> SourceData:
    """Parses a --data value (`digits`, `tfrecord:DIR`, `emnist:DIR`) and loads it.

    Raises:
      ValueError: for an unknown source; DataUnavailable when its files are missing.
    """
    kind, _, arg = text.partition(":")
    if kind == "digits" and not arg:
        return load_digits_source(rng)
    if kind == "tfrecord" and arg:
        return load_tfrecord_source(Path(arg))
    if kind == "emnist" and arg:
        return load_emnist_source(Path(arg), max_writers)
    raise ValueError(f"unknown data source {text!r}; use digits, tfrecord:DIR or emnist:DIR")


def _deal(
    pool: ExamplePool,
    n: int,
    spec: partitioning.PartitionSpec,
    rng: np.random.Generator,
) -> list[tuple[bytes, ...]]:
    if spec.kind == "dirichlet" and (pool.labels < 0).any():
        raise ValueError("label-skewed partitioning needs an int64 label 'y' in every example")
    parts = partitioning.partition(spec, pool.labels, n, rng, groups=pool.groups)
    return [tuple(pool.records[i] for i in part) for part in parts]


def assign_devices(
    source: SourceData,
    n_devices: int,
    spec: partitioning.PartitionSpec,
    rng: np.random.Generator,
    *,
    eval_device_fraction: float = 0.2,
) -> list[DeviceData]:
    """Deals the pools out: training devices get `train` data, held-out devices `eval` data.

    Raises:
      ValueError: for bad sizes or fractions.
    """
    if not 0 < n_devices <= MAX_DEVICES:
        raise ValueError(f"devices must be in [1, {MAX_DEVICES}]: {n_devices}")
    if not 0 <= eval_device_fraction < 1:
        raise ValueError(f"eval_device_fraction must be in [0, 1): {eval_device_fraction}")
    n_eval = 0
    if source.heldout is not None and eval_device_fraction > 0 and n_devices > 1:
        n_eval = max(1, round(n_devices * eval_device_fraction))
    devices = [
        DeviceData(f"device-{i:05d}", {TRAIN: recs})
        for i, recs in enumerate(_deal(source.train, n_devices - n_eval, spec, rng))
    ]
    if n_eval and source.heldout is not None:
        base = len(devices)
        for j, recs in enumerate(_deal(source.heldout, n_eval, spec, rng)):
            devices.append(DeviceData(f"device-{base + j:05d}", {EVAL: recs}))
    return devices
