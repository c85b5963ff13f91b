"""B2: the server's aggregation (B1's path) against TFF's `gaussian_fixed` DP aggregator.

TFF side: `tff.aggregators.DifferentiallyPrivateFactory.gaussian_fixed(z, n, C)` (McMahan et
al. 2018, arXiv 1710.17220) created for the model's float32 tensors and run with TFF 0.87's
default C++ execution context on the same N updates as numpy arrays: per-client L2 clip, sum,
N(0, (zC)^2) noise, fixed denominator. One call compiles and is not timed. TFF does less than
ours here (no update decoding or validation, no server optimizer step). The `worker_binary`
TFF leaves behind is ended through `task_builder.tff_runtime`.
"""

import time

import numpy as np

from tools.benchmarks import b1_aggregation, workload
from tools.benchmarks.figures import Figure
from tools.benchmarks.timing import best_seconds


def tff_updates_per_second(w: b1_aggregation.Workload, repeats: int) -> float:
    """TFF's gaussian_fixed aggregation process over the workload's N updates."""
    import tensorflow_federated as tff

    spec = w.plan.aggregation
    factory = tff.aggregators.DifferentiallyPrivateFactory.gaussian_fixed(
        noise_multiplier=float(spec.noise_multiplier),
        clients_per_round=float(spec.clients_per_round),
        clip=float(spec.clip_norm),
    )
    value_type = tff.types.to_type([tff.TensorType(np.float32, s) for s in w.shapes])
    process = factory.create(value_type)
    state = process.initialize()
    values = [list(w.update(i)) for i in range(w.num_updates)]
    process.next(state, values)  # trace and compile

    def one_round() -> None:
        process.next(state, values)

    return w.num_updates / best_seconds(one_round, repeats)


def run(quick: bool) -> list[Figure]:
    """B2 at the EMNIST CNN size (quick: tiny model)."""
    from task_builder import tff_runtime

    tff_runtime.install_reaper()
    shapes, n = (workload.TINY, 10) if quick else (workload.EMNIST_CNN, 100)
    repeats = 1 if quick else 2
    w = b1_aggregation.make_workload(shapes, n)
    started = time.monotonic()
    # TFF's worker_binary is ended when the runner exits (install_reaper), not here: TFF keeps
    # its handle, and a later TFF benchmark in this process would find it dead.
    theirs = tff_updates_per_second(w, repeats)
    tff_seconds = time.monotonic() - started
    ours = b1_aggregation.server_updates_per_second(w, repeats)
    return [
        Figure(
            benchmark="B2",
            name=f"aggregation vs TFF gaussian_fixed, {workload.size_label(shapes)} x {n}",
            ours=ours,
            unit="updates/s",
            baseline=theirs,
            baseline_name="TFF 0.87 DifferentiallyPrivateFactory.gaussian_fixed, C++ context",
            target_on="ratio",
            target=20.0,
            direction="higher",
            notes=f"both in the runner process (TFF's worker_binary is its child, "
            f"{tff_seconds:.0f} s with compilation); best of {repeats}",
        )
    ]
