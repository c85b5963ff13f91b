"""Session fixtures: the example models saved once as real FunctionalModels, and config builders."""

import pathlib

import pytest
from google.protobuf import text_format

from fcp_server.protos import task_builder_pb2

pytest.importorskip("tensorflow_federated")

from task_builder import model_loading
from task_builder.examples import save_models


@pytest.fixture(scope="session")
def saved_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("saved_models")
    for name in ("digits_cnn", "dense_dict"):
        save_models.save_example(name, out)
    return out


@pytest.fixture(scope="session")
def digits_model(saved_dir):
    return model_loading.load_model(str(saved_dir / "digits_cnn"))


@pytest.fixture(scope="session")
def dense_model(saved_dir):
    return model_loading.load_model(str(saved_dir / "dense_dict"))


def make_config(
    *,
    mode: str = "TRAINING_AND_EVAL",
    label_name: str = "",
    algo: str = "FED_AVG",
    client_opt: str = "SGD",
    client_lr: float = 0.1,
    server_opt: str = "SGD",
    server_lr: float = 1.0,
    server_momentum: float = 0.0,
    dp: str = "FIXED_GAUSSIAN",
    noise: float = 0.5,
    clip: float = 1.0,
    report_goal: int = 20,
    metrics: tuple[str, ...] = (),
    batch_size: int = 4,
    max_batches: int = -1,
    epochs: int = 1,
) -> task_builder_pb2.TaskConfig:
    metric_text = " ".join(f'metrics {{ name: "{m}" }}' for m in metrics)
    text = f"""
      mode: {mode} population_name: "p" label_name: "{label_name}"
      policies {{
        model_release_policy {{ num_max_training_rounds: 7 dp_target_epsilon: 10 dp_delta: 1e-7 }}
        dataset_policy {{ batch_size: {batch_size} max_training_batches_per_client: {max_batches}
                          num_epochs: {epochs} }}
      }}
      federated_learning {{
        learning_process {{
          type: {algo} client_optimizer: {client_opt} client_learning_rate: {client_lr}
          server_optimizer: {server_opt} server_learning_rate: {server_lr}
          server_momentum: {server_momentum}
          runtime_config {{ report_goal: {report_goal} over_selection_rate: 0.3
                            example_selector_uri: "app://train" }}
          {metric_text}
        }}
        evaluation {{ report_goal: 5 over_selection_rate: 0.2 example_selector_uri: "app://eval"
                      source_training_task_id: 1 }}
      }}
      differential_privacy {{ type: {dp} noise_multiplier: {noise} clip_norm: {clip}
                              init_clip_norm: {clip} population_size: 1000 }}
    """
    return text_format.Parse(text, task_builder_pb2.TaskConfig())
