"""Blob names and server-relative URLs of every artifact, in the ODP storage layout.

Blob names follow the ODP `GCSBlobManager` layout (odp-federated-compute.md section 2.7):
`s` = server, `d` = device, `0` = worker id, and N the result (round) id:

    {pop}/{task}/0/s/0/client_only_plan     device plan (fcp.ClientOnlyPlan)
    {pop}/{task}/0/s/0/server_phase         server plan (fcp.ServerPlan)
    {pop}/{task}/0/s/0/uploads/{kind}/{sha} an uploaded artifact, by content (`artifacts`)
    {pop}/{task}/N/s/0/checkpoint           server state after round N (0 = initial)
    {pop}/{task}/N/d/0/client_checkpoint    weights devices download for round N+1
    {pop}/{task}/N/s/0/metrics              flat JSON metrics of round N
    {pop}/{task}/N/s/0/staged_outputs       all of round N's outputs, staged before publishing
    {pop}/{task}/N/d/{assignment}/gradient  one device's update for round N

URLs are server-relative paths; the task builder PUTs artifacts to the task-management ones
and devices GET/PUT the task-assignment ones.
"""

import re

# Shapes of path segments (also published in the OpenAPI description).
POPULATION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"
ASSIGNMENT_PATTERN = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
_POPULATION_RE = re.compile(POPULATION_PATTERN)
_ASSIGNMENT_RE = re.compile(ASSIGNMENT_PATTERN)
TM_PREFIX = "/taskmanagement/v1"
TA_PREFIX = "/taskassignment/v1"
# Artifact kinds the task builder uploads, and their blob file names.
ARTIFACT_KINDS = {
    "client_only_plan": "client_only_plan",
    "server_phase": "server_phase",
    "checkpoint": "checkpoint",
}


def is_valid_population(name: str) -> bool:
    """Population names: 1-64 of [A-Za-z0-9_.-], starting alphanumeric (no slashes, as ODP)."""
    # fullmatch: `$` alone also matches before a trailing newline ("pop\n" would pass).
    return _POPULATION_RE.fullmatch(name) is not None


def is_valid_assignment_id(assignment_id: str) -> bool:
    """Assignment ids are lowercase uuid4 strings."""
    return _ASSIGNMENT_RE.fullmatch(assignment_id) is not None


def artifact_blob(pop: str, task_id: int, kind: str) -> str:
    """Blob of a builder artifact (`client_only_plan`, `server_phase` or `checkpoint`)."""
    return f"{pop}/{task_id}/0/s/0/{ARTIFACT_KINDS[kind]}"


def uploaded_artifact_blob(pop: str, task_id: int, kind: str, sha256: str) -> str:
    """Where an upload stores an artifact, named by its SHA-256 (never rewritten otherwise).

    The open publishes the bytes it validated at `artifact_blob`.
    """
    return f"{pop}/{task_id}/0/s/0/uploads/{ARTIFACT_KINDS[kind]}/{sha256}"


def server_checkpoint_blob(pop: str, task_id: int, result_id: int) -> str:
    """Server state after round `result_id` (0 is the builder's initial checkpoint)."""
    return f"{pop}/{task_id}/{result_id}/s/0/checkpoint"


def client_checkpoint_blob(pop: str, task_id: int, result_id: int) -> str:
    """Weights devices download to train or evaluate from result `result_id`."""
    return f"{pop}/{task_id}/{result_id}/d/0/client_checkpoint"


def metrics_blob(pop: str, task_id: int, result_id: int) -> str:
    """Flat JSON metrics of round `result_id`."""
    return f"{pop}/{task_id}/{result_id}/s/0/metrics"


def staged_outputs_blob(pop: str, task_id: int, result_id: int) -> str:
    """Everything round `result_id` publishes, staged once before publishing (`round_outputs`)."""
    return f"{pop}/{task_id}/{result_id}/s/0/staged_outputs"


def gradient_blob(pop: str, task_id: int, result_id: int, assignment_id: str) -> str:
    """One device's uploaded update."""
    return f"{pop}/{task_id}/{result_id}/d/{assignment_id}/gradient"


def artifact_url(pop: str, task_id: int, kind: str) -> str:
    """Where the task builder PUTs an artifact."""
    return f"{TM_PREFIX}/population/{pop}/tasks/{task_id}/artifacts/{kind}"


def metrics_url(pop: str, task_id: int) -> str:
    """Task-level metrics URL reported in Task.metrics_url (the round metrics prefix)."""
    return f"{TM_PREFIX}/population/{pop}/tasks/{task_id}/metrics"


def plan_download_url(pop: str, task_id: int) -> str:
    """Where devices GET the client-only plan."""
    return f"{TA_PREFIX}/population/{pop}/task/{task_id}/client_only_plan"


def checkpoint_download_url(pop: str, task_id: int, result_id: int) -> str:
    """Where devices GET the client checkpoint of a result."""
    return f"{TA_PREFIX}/population/{pop}/task/{task_id}/aggregation/{result_id}/client_checkpoint"


def assignment_path(pop: str, task_id: int, iteration_id: int, assignment_id: str) -> str:
    """ODP's self_uri of an assignment (relative to the task-assignment prefix)."""
    return (
        f"/population/{pop}/task/{task_id}/aggregation/{iteration_id}"
        f"/task-assignment/{assignment_id}"
    )


def upload_url(pop: str, task_id: int, iteration_id: int, assignment_id: str) -> str:
    """Where a device PUTs its update after report-result COMPLETED."""
    return f"{TA_PREFIX}{assignment_path(pop, task_id, iteration_id, assignment_id)}:upload"
