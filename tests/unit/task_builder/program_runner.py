"""Runs device-program signatures with the TFLite interpreter, as a device would."""

import numpy as np
import tensorflow as tf

from fcp_server.protos import plan_pb2


def runner(plan: plan_pb2.ClientOnlyPlan, signature: str):
    interpreter = tf.lite.Interpreter(model_content=plan.tflite_model)
    return interpreter.get_signature_runner(signature)


def weight_feed(weights) -> dict[str, np.ndarray]:
    return {f"trainable_{i}": np.asarray(w, np.float32) for i, w in enumerate(weights)}


def batch_feed(plan: plan_pb2.ClientOnlyPlan, features: dict[str, np.ndarray], label) -> dict:
    feed = {f.input_name: features[f.name] for f in plan.data_spec.features}
    feed[plan.data_spec.label.input_name] = label
    return feed


def metric_states(plan: plan_pb2.ClientOnlyPlan, outputs: dict) -> dict[str, list[np.ndarray]]:
    return {
        spec.name: [np.asarray(outputs[f"metric_{m}_{k}"]) for k in range(len(spec.state))]
        for m, spec in enumerate(plan.metrics)
    }
