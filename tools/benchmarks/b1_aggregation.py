"""B1: the server's aggregation kernel against numpy's in-place add (memory bandwidth).

Ours is the round close's compute stage exactly as `services.round_close._train` runs it,
minus the blob store read (B5 covers that): for each of N updates `checkpoints.decode_update`
(safetensors header, names, shapes, dtypes, finiteness with the squared norm) then
`RoundAccumulator.add` (zeroing checks, L2 clip, float32 BLAS running sum), then
`finalize_round` (float64 Gaussian noise, the fixed denominator and the server SGD step).
The baseline adds the same float32 arrays in place into float32 sums, the least work any
aggregator must do: one read of every update.
"""

import dataclasses
import functools

import numpy as np

from fcp_server import checkpoints
from fcp_server.aggregation import ModelWeights, RoundAccumulator, ServerState, finalize_round
from fcp_server.protos import plan_pb2
from tools.benchmarks import workload
from tools.benchmarks.figures import Figure
from tools.benchmarks.timing import best_seconds
from tools.benchmarks.workload import Array

# Distinct updates cycled through: together larger than the CPU caches (32 MiB L3 here).
DISTINCT_UPDATES = 8


@dataclasses.dataclass(frozen=True)
class Workload:
    """N updates (as upload bytes and as arrays) for one model size."""

    shapes: workload.Shapes
    num_updates: int
    blobs: tuple[bytes, ...]
    arrays: tuple[tuple[Array, ...], ...]
    plan: plan_pb2.ServerPlan
    state: ServerState

    def blob(self, i: int) -> bytes:
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
        blobs=tuple(workload.update_bytes(a) for a in arrays),
        arrays=tuple(tuple(a) for a in arrays),
        plan=workload.server_plan(shapes, report_goal=num_updates),
        state=ServerState(ModelWeights(weights, ()), {}, {}),
    )


def server_round(w: Workload, rng: np.random.Generator) -> None:
    """Decode + validate, clip and sum N updates, then noise and the optimizer step."""
    acc = RoundAccumulator(w.plan, w.state.aggregator_state)
    layout = checkpoints.update_layout(w.plan)
    limit = 1 << 31
    for i in range(w.num_updates):
        acc.add(checkpoints.decode_update(w.blob(i), layout, max_bytes=limit))
    finalize_round(acc, w.state, w.plan, rng)


def numpy_add(w: Workload) -> None:
    """The baseline: in-place float32 add of the same N updates."""
    sums = [np.zeros(s, dtype=np.float32) for s in w.shapes]
    for i in range(w.num_updates):
        for total, tensor in zip(sums, w.update(i), strict=True):
            np.add(total, tensor, out=total)


def server_updates_per_second(w: Workload, repeats: int) -> float:
    """Our aggregation throughput (best of `repeats`)."""
    rng = np.random.default_rng(1)
    return w.num_updates / best_seconds(lambda: server_round(w, rng), repeats)


def run(quick: bool) -> list[Figure]:
    """B1 at the EMNIST CNN size (and 10M parameters unless quick)."""
    sizes = (
        [(workload.TINY, 10)] if quick else [(workload.EMNIST_CNN, 100), (workload.WIDE_10M, 20)]
    )
    repeats = 1 if quick else 3
    figures = []
    for shapes, n in sizes:
        w = make_workload(shapes, n)
        ours = server_updates_per_second(w, repeats)
        base = n / best_seconds(functools.partial(numpy_add, w), repeats)
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
                "noise and server SGD",
            )
        )
    return figures
