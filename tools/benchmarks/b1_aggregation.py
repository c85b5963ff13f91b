"""B1: the server's aggregation kernel against numpy's in-place add (memory bandwidth).

Ours is the round close's compute stage exactly as `services.round_close._train` runs it,
minus the blob store read (B5 covers that; the updates lie in memory as that read leaves
them, in a `ReadBuffer` on transparent huge pages): for each of N updates
`checkpoints.decode_update` (safetensors header, names, shapes, dtypes, finiteness with the
squared norm) then `RoundAccumulator.add` (zeroing checks, L2 clip, float32 BLAS running sum),
then `finalize_round` (float64 Gaussian noise, the fixed denominator and the server SGD step);
as in the round close, the noise's draws start with the round (`start_noise`) and run in the
noise threads while the updates are summed.
The baseline adds the same float32 arrays in place into float32 sums, the least work any
aggregator must do: one read of every update. The notes add two floors measured alike: the
norm and the clipped add alone, and those plus the round's float64 noise, whose cost grows
with the model but not with the number of updates.
"""

import dataclasses
import functools
import math

import numpy as np

from fcp_server import checkpoints
from fcp_server.aggregation import (
    ModelWeights,
    RoundAccumulator,
    ServerState,
    finalize_round,
    gaussian_noise,
    update_norms,
)
from fcp_server.aggregation.state import ClientUpdate
from fcp_server.protos import plan_pb2
from fcp_server.storage.read_buffers import ReadBuffer
from tools.benchmarks import workload
from tools.benchmarks.figures import Figure
from tools.benchmarks.timing import best_seconds
from tools.benchmarks.workload import Array

# Distinct updates cycled through: 53 MB at 1.66M and 320 MB at 10M parameters, larger than
# most CPUs' caches (some machines of this kind report a 480 MiB L3 shared with other tenants).
DISTINCT_UPDATES = 8


@dataclasses.dataclass(frozen=True)
class Workload:
    """N updates (as upload bytes and as arrays) for one model size."""

    shapes: workload.Shapes
    num_updates: int
    blobs: tuple[memoryview, ...]
    arrays: tuple[tuple[Array, ...], ...]
    plan: plan_pb2.ServerPlan
    state: ServerState

    def blob(self, i: int) -> memoryview:
        """The i-th update's bytes (cycling through the distinct ones)."""
        return self.blobs[i % len(self.blobs)]

    def update(self, i: int) -> tuple[Array, ...]:
        """The i-th update's arrays."""
        return self.arrays[i % len(self.arrays)]


def make_workload(shapes: workload.Shapes, num_updates: int, seed: int = 0) -> Workload:
    """Random updates of the model's shapes and the plan/state they are aggregated with."""
    rng = np.random.default_rng(seed)
    arrays = [workload.update_arrays(shapes, rng) for _ in range(DISTINCT_UPDATES)]
    weights = tuple(workload.random_weights(shapes, rng, 0.05))
    return Workload(
        shapes=shapes,
        num_updates=num_updates,
        blobs=tuple(_as_read(workload.update_bytes(a)) for a in arrays),
        arrays=tuple(tuple(a) for a in arrays),
        plan=workload.server_plan(shapes, report_goal=num_updates),
        state=ServerState(ModelWeights(weights, ()), {}, {}),
    )


def _as_read(blob: bytes) -> memoryview:
    """The blob in memory as the round close reads it (a `ReadBuffer` of its own)."""
    view = ReadBuffer().take(len(blob))
    view[:] = blob
    return view.toreadonly()


def server_round(w: Workload, rng: np.random.Generator) -> None:
    """Decode + validate, clip and sum N updates, then noise and the optimizer step."""
    acc = RoundAccumulator(w.plan, w.state.aggregator_state)
    acc.start_noise(rng)  # as the round close does: drawn while the updates are summed
    layout = checkpoints.update_layout(w.plan)
    limit = 1 << 31
    for i in range(w.num_updates):
        acc.add(checkpoints.decode_update(w.blob(i), layout, max_bytes=limit))
    finalize_round(acc, w.state, w.plan, rng)


def two_passes(w: Workload, flats: tuple[Array, ...]) -> Array:
    """What any server-side clipping must do: the norm of each update, then its clipped add.

    The same kernels as ours (`update_norms`) over the updates' flat trainable regions, with
    no decoding, bookkeeping, noise or optimizer: the floor our aggregation stands on.
    Returns the sum.
    """
    total = update_norms.zeroed_sum(flats[0].size, np.dtype(np.float32))
    for i in range(w.num_updates):
        flat = flats[i % len(flats)]
        norm = math.sqrt(update_norms.sum_of_squares((flat,)))
        update_norms.add_scaled((total,), (flat,), min(1.0, 0.5 / norm))
    return total


def two_passes_and_noise(w: Workload, flats: tuple[Array, ...], rng: np.random.Generator) -> None:
    """`two_passes`, then one float64 Gaussian draw per parameter added to the sum.

    The least a DP aggregator that clips on the server does per round: the noise's cost does
    not shrink with the number of updates, so with few large updates it alone can exceed half
    the baseline's time.
    """
    gaussian_noise.noised((two_passes(w, flats),), 1.0, rng, divisor=float(w.num_updates))


def numpy_add(w: Workload) -> None:
    """The baseline: in-place float32 add of the same N updates."""
    # Zeros written up front (as the accumulator does): numpy's lazily mapped zeros fault in
    # during the adds, which made this baseline ~1.4x slower at 10M parameters.
    sums = [update_norms.zeroed_sum(s, np.dtype(np.float32)) for s in w.shapes]
    for i in range(w.num_updates):
        for total, tensor in zip(sums, w.update(i), strict=True):
            np.add(total, tensor, out=total)


def server_updates_per_second(w: Workload, repeats: int) -> float:
    """Our aggregation throughput (best of `repeats`)."""
    rng = np.random.default_rng(1)
    return w.num_updates / best_seconds(lambda: server_round(w, rng), repeats)


def _flat(update: ClientUpdate) -> Array:
    if update.trainable_flat is None:
        raise RuntimeError("the benchmark's updates must have a flat trainable region")
    return update.trainable_flat


def run(quick: bool) -> list[Figure]:
    """B1 at the EMNIST CNN size (and 10M parameters unless quick)."""
    sizes = (
        [(workload.TINY, 10)] if quick else [(workload.EMNIST_CNN, 100), (workload.WIDE_10M, 20)]
    )
    repeats = 1 if quick else 3
    figures = []
    for shapes, n in sizes:
        w = make_workload(shapes, n)
        # Untimed: the first round imports scipy's BLAS and starts the noise threads (with
        # one repeat, as --quick runs, that once-per-process cost was most of the figure).
        server_round(w, np.random.default_rng(0))
        ours = server_updates_per_second(w, repeats)
        base = n / best_seconds(functools.partial(numpy_add, w), repeats)
        layout = checkpoints.update_layout(w.plan)
        flats = tuple(
            _flat(checkpoints.decode_update(b, layout, max_bytes=1 << 31)) for b in w.blobs
        )
        floor = n / best_seconds(functools.partial(two_passes, w, flats), repeats)
        noise_rng = np.random.default_rng(2)
        with_noise = n / best_seconds(
            functools.partial(two_passes_and_noise, w, flats, noise_rng), repeats
        )
        figures.append(
            Figure(
                benchmark="B1",
                name=f"aggregation {workload.size_label(shapes)} params x {n} updates",
                ours=ours,
                unit="updates/s",
                baseline=base,
                baseline_name="numpy in-place float32 add of the same arrays",
                target_on="ratio",
                target=0.5,
                direction="higher",
                notes="both in the runner process, one core each in turn; best of "
                f"{repeats}; ours includes decode_update validation, clip, float32 sum, "
                "noise and server SGD; the norm and the clipped add alone (two passes over "
                f"each update, nothing else) made {floor:,.0f} updates/s "
                f"({floor / base:.2f}x the baseline); those two passes plus one float64 "
                f"Gaussian draw per parameter made {with_noise:,.0f} updates/s "
                f"({with_noise / base:.2f}x)",
            )
        )
    return figures
