"""The task both sides run: the dense_dict example config with a DP type, and client data.

The config is `configs/dense_dict_task.pbtxt` (the real example) with a small report goal, a
few rounds and the DP type under test. The client optimizer is switched from Adam to SGD: Adam
bounds every step by its learning rate, so no client could send the outsized update that
exercises the tree types' zeroing (L-inf above 100 x clip).
"""

import pathlib

import numpy as np
from google.protobuf import text_format

from client_sim import examples
from fcp_server.protos import task_builder_pb2

ROOT = pathlib.Path(__file__).resolve().parents[3]
Dp = task_builder_pb2.DpAggregator
CLIENTS_PER_ROUND = 3

# (examples, feature scale, balanced labels) per client. Updates have L2 norms of about 0.2
# to 1, above the clip of 0.15, except client 2's: its features are tiny and each batch holds
# as many 0 as 1 labels, so its gradients nearly cancel and its updates stay below the clip.
# Client 4's features are 100x larger: its first update's largest element (~30) is above the
# tree types' zeroing norm 100 x 0.15 = 15.
CLIENTS: tuple[tuple[int, float, bool], ...] = (
    (3, 1.0, False),
    (12, 0.3, False),
    (4, 0.05, True),
    (20, 1.0, False),
    (5, 100.0, False),
)
# Which clients report in each round, in order (the same lists go to TFF's `next`).
SCHEDULE: tuple[tuple[int, ...], ...] = ((0, 1, 4), (2, 3, 0), (4, 2, 1), (1, 3, 2), (3, 4, 0))
CLIP = 0.15


def make_config(dp_type: int, *, noise_multiplier: float) -> task_builder_pb2.TaskConfig:
    """The example dense_dict TaskConfig, training only, with the given DP aggregator."""
    config = text_format.Parse(
        (ROOT / "configs" / "dense_dict_task.pbtxt").read_text(), task_builder_pb2.TaskConfig()
    )
    config.mode = task_builder_pb2.TaskMode.TRAINING_ONLY
    config.federated_learning.ClearField("evaluation")
    config.population_name = f"dp_equivalence_{Dp.Enum.Name(dp_type).lower()}"
    config.policies.model_release_policy.num_max_training_rounds = len(SCHEDULE)
    lp = config.federated_learning.learning_process
    lp.runtime_config.report_goal = CLIENTS_PER_ROUND
    lp.client_optimizer = task_builder_pb2.Optimizer.SGD
    lp.client_learning_rate = 0.5
    dp = config.differential_privacy
    dp.type = dp_type  # type: ignore[assignment]
    dp.noise_multiplier = noise_multiplier
    dp.clip_norm = CLIP
    dp.init_clip_norm = CLIP
    return config


def client_records(seed: int = 2024) -> list[list[bytes]]:
    """Serialized tf.train.Examples of every client in CLIENTS (features and a 0/1 label)."""
    rng = np.random.default_rng(seed)
    clients = []
    for count, scale, balanced in CLIENTS:
        records = []
        for i in range(count):
            label = i % 2 if balanced else int(rng.random() < 0.5)
            features = {
                "age_bucket": (rng.normal(size=4) * scale).astype(np.float32),
                "activity": (rng.normal(size=3) * scale).astype(np.float32),
                "clicked": np.array([float(label)], np.float32),
            }
            records.append(examples.encode_example(features))
        clients.append(records)
    return clients
