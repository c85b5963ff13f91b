"""Errors of the task builder, one tree, each mapped to an ODP `ErrorType` and HTTP status.

TaskBuilderError
├── TaskConfigError        invalid TaskConfig (ODP: INVALID_REQUEST, HTTP 400)
│   └── DpBudgetError      epsilon above the target (INVALID_REQUEST, HTTP 400)
├── ModelLoadError         the saved model cannot be loaded/used (INVALID_REQUEST, HTTP 400)
├── ArtifactBuildError     plan/checkpoint building failed (ARTIFACT_BUILDING_ERROR, HTTP 500)
│   └── FlexOpsError       the device program needs ops outside the allowlist (HTTP 422)
├── TaskManagementError    the server refused or failed task registration (HTTP 502)
│   └── TaskConflictError  the population already has an active task (HTTP 409)
└── BuildRequestError      the build request itself is malformed (INVALID_REQUEST, HTTP 400)
    ├── RequestTooLargeError   the body exceeds the service's bound (HTTP 413)
    └── UnsupportedMediaError  neither protobuf nor JSON (HTTP 415)
"""

from fcp_server.protos import task_builder_pb2


class TaskBuilderError(Exception):
    """Base of every task-builder error."""

    error_type: int = task_builder_pb2.ErrorType.UNKNOWN
    http_status: int = 500


class TaskConfigError(TaskBuilderError):
    """The TaskConfig breaks a validation rule; the message follows ODP's template."""

    error_type = task_builder_pb2.ErrorType.INVALID_REQUEST
    http_status = 400


class DpBudgetError(TaskConfigError):
    """The DP setup spends more epsilon than `dp_target_epsilon` allows."""


class ModelLoadError(TaskBuilderError):
    """The saved FunctionalModel cannot be loaded or does not fit the config."""

    error_type = task_builder_pb2.ErrorType.INVALID_REQUEST
    http_status = 400


class ArtifactBuildError(TaskBuilderError):
    """Building or writing a plan, TFLite program or checkpoint failed."""

    error_type = task_builder_pb2.ErrorType.ARTIFACT_BUILDING_ERROR
    http_status = 500


class FlexOpsError(ArtifactBuildError):
    """The device program uses select-TF ops that no allowlisted client version supports."""

    http_status = 422


class TaskManagementError(TaskBuilderError):
    """Registering, uploading or opening the tasks on the server failed."""

    error_type = task_builder_pb2.ErrorType.TASK_MANAGEMENT_ERROR
    http_status = 502


class TaskConflictError(TaskManagementError):
    """The server refused the tasks: the population already has an active one of that kind."""

    http_status = 409


class BuildRequestError(TaskBuilderError):
    """The BuildTaskRequest cannot be decoded (bad body, media type or size)."""

    error_type = task_builder_pb2.ErrorType.INVALID_REQUEST
    http_status = 400


class RequestTooLargeError(BuildRequestError):
    """The request body is larger than the service accepts."""

    http_status = 413


class UnsupportedMediaError(BuildRequestError):
    """The request body is neither binary protobuf nor proto3 JSON."""

    http_status = 415
