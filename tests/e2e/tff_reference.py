"""The reference side of the HTTP equivalence test: TFF's own learning process in simulation.

Run as `python -m tests.e2e.tff_reference SPEC.json` in a process of its own, so that the
`worker_binary` TFF's C++ runtime starts is ended (by `tff_runtime`'s reaper) when this
process exits, i.e. within the test that started it. The spec names the saved
FunctionalModel, the normalized TaskConfig (text format), one TFRecord file per client in
selection order, the number of rounds and the output directory. The process is
`learning_process.compose(model, config, skip_dp_aggregator=True)`, exactly what the builder
composes for a task built with --skip_dp_aggregator, and every round it trains on all the
clients, each read by `data_spec.client_dataset` (the devices' batching). Outputs:
`weights.npz` (`<round>/<i>` = trainable tensor i after that round) and `metrics.json`
(round -> the flattened `client_work/train` metrics).
"""

import json
import pathlib
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
from google.protobuf import text_format

from fcp_server.protos import task_builder_pb2
from task_builder import data_spec, learning_process, model_loading, tff_runtime


def _data_spec(config: task_builder_pb2.TaskConfig, inputs: data_spec.ModelInputs) -> Any:
    # The same DataSpec fields `plans._data_spec` writes into the device plan.
    policy = config.policies.dataset_policy
    return data_spec.build_data_spec(
        inputs,
        batch_size=policy.batch_size,
        max_batches=policy.max_training_batches_per_client or -1,
        num_epochs=max(1, policy.num_epochs),
        example_selector_uri="",
    )


def _flatten(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = float(np.asarray(value))
    return flat


def run(spec: Mapping[str, Any]) -> None:
    """Runs the rounds the spec asks for and writes the weights and metrics after each."""
    model = model_loading.load_model(spec["saved_model"])
    config = text_format.Parse(
        pathlib.Path(spec["task_config"]).read_text(), task_builder_pb2.TaskConfig()
    )
    inputs = data_spec.describe_inputs(model.input_spec, config.label_name)
    client_spec = _data_spec(config, inputs)
    datasets = [
        data_spec.client_dataset(tf.data.TFRecordDataset(path), inputs, client_spec)
        for path in spec["clients"]
    ]
    process = learning_process.compose(model, config, skip_dp_aggregator=True)
    state = process.initialize()
    weights: dict[str, np.ndarray[Any, Any]] = {}
    metrics: dict[str, dict[str, float]] = {}
    for n in range(1, int(spec["rounds"]) + 1):
        output = process.next(state, datasets)
        state = output.state
        for i, w in enumerate(process.get_model_weights(state).trainable):
            weights[f"{n}/{i}"] = np.asarray(w)
        metrics[str(n)] = _flatten(output.metrics["client_work"]["train"])
    out = pathlib.Path(spec["out"])
    np.savez(out / "weights.npz", **weights)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))


def main(argv: Sequence[str]) -> int:
    """Entry point: `python -m tests.e2e.tff_reference SPEC.json`."""
    tff_runtime.install_reaper()
    run(json.loads(pathlib.Path(argv[0]).read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
