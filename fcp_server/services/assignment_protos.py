"""Builds the TaskAssignment a device receives at check-in (ODP field by field).

ODP fills: task_id and aggregation_id as strings, a random assignment (session) id,
task_name `/population/{pop}/task/{task}`, self_uri, the plan and the client checkpoint of
the round's base result as Resources, and the task's EligibilityTaskInfo with
`min_sep_policy.current_index` set to the round (iteration) id, which the device's
minimum-separation check needs (odp-federated-compute.md sections 2.2 and 2.8).

Everything but the assignment id, its self_uri and the report deadline is the same for every
device of a round, so that part is built once per round and copied (parsing the task's info
JSON on every check-in cost more than the rest of the answer).
"""

import datetime as dt
import functools

from google.protobuf import json_format, timestamp_pb2

from fcp_server.protos import common_pb2, task_assignments_pb2, task_pb2
from fcp_server.services import blob_paths
from fcp_server.services.checkin import Assigned

_GZIP = common_pb2.RESOURCE_COMPRESSION_FORMAT_GZIP
_PLAIN = common_pb2.RESOURCE_COMPRESSION_FORMAT_UNSPECIFIED
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def eligibility_info(info_json: str, iteration_id: int) -> common_pb2.EligibilityTaskInfo:
    """The task's eligibility policies with every min-sep index set to the round id."""
    info = task_pb2.TaskInfo()
    json_format.Parse(info_json, info)
    eligibility = common_pb2.EligibilityTaskInfo()
    if info.WhichOneof("info") == "training_info":
        eligibility.CopyFrom(info.training_info.eligibility_task_info)
    for policy in eligibility.eligibility_policies:
        if policy.WhichOneof("policy_type") == "min_sep_policy":
            policy.min_sep_policy.current_index = iteration_id
    return eligibility


@functools.lru_cache(maxsize=256)
def _round_part(
    pop: str,
    task_id: int,
    iteration_id: int,
    base_result_id: int,
    plan_sha256: str,
    checkpoint_sha256: str,
    info_json: str,
    gzip: bool,
) -> task_assignments_pb2.TaskAssignment:
    """The fields every assignment of one round shares (cached: never mutate the result)."""
    compression = _GZIP if gzip else _PLAIN
    return task_assignments_pb2.TaskAssignment(
        population_name=pop,
        task_id=str(task_id),
        aggregation_id=str(iteration_id),
        task_name=f"/population/{pop}/task/{task_id}",
        plan=common_pb2.Resource(
            uri=blob_paths.plan_download_url(pop, task_id),
            client_cache_id=plan_sha256,
            sha256_checksum=plan_sha256,
            compression_format=compression,
        ),
        init_checkpoint=common_pb2.Resource(
            uri=blob_paths.checkpoint_download_url(pop, task_id, base_result_id),
            sha256_checksum=checkpoint_sha256,
            compression_format=compression,
        ),
        eligibility_task_info=eligibility_info(info_json, iteration_id),
    )


def fill_task_assignment(
    proto: task_assignments_pb2.TaskAssignment,
    assigned: Assigned,
    *,
    gzip: bool,
    local_timeout: int,
) -> None:
    """Writes the device's TaskAssignment for a new assignment into `proto` (replacing it).

    Filled in place (typically the answer's own field), so the answer is not built twice.
    """
    rnd = assigned.round
    pop, tid, n = rnd.population_name, rnd.task_id, rnd.iteration_id
    proto.CopyFrom(
        _round_part(
            pop,
            tid,
            n,
            rnd.base_result_id,
            rnd.client_plan_sha256 or "",
            rnd.client_checkpoint_sha256 or "",
            rnd.info_json,
            gzip,
        )
    )
    proto.assignment_id = assigned.assignment_id
    proto.self_uri = blob_paths.assignment_path(pop, tid, n, assigned.assignment_id)
    _set_timestamp(proto.report_deadline, assigned.created_at + dt.timedelta(seconds=local_timeout))


def _set_timestamp(stamp: timestamp_pb2.Timestamp, when: dt.datetime) -> None:
    """`stamp.FromDatetime(when)` for an aware `when`, in exact integer arithmetic.

    The same seconds and nanos as protobuf's own conversion, without its time-tuple detour,
    which cost more than the rest of the answer.
    """
    since = when - _EPOCH  # TypeError for a naive `when`, like any aware/naive mix
    stamp.seconds = since.days * 86_400 + since.seconds
    stamp.nanos = since.microseconds * 1_000
