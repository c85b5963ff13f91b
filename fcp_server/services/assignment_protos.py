"""Builds the TaskAssignment a device receives at check-in (ODP field by field).

ODP fills: task_id and aggregation_id as strings, a random assignment (session) id,
task_name `/population/{pop}/task/{task}`, self_uri, the plan and the client checkpoint of
the round's base result as Resources, and the task's EligibilityTaskInfo with
`min_sep_policy.current_index` set to the round (iteration) id, which the device's
minimum-separation check needs (odp-federated-compute.md sections 2.2 and 2.8).
"""

import datetime as dt

from google.protobuf import json_format

from fcp_server.protos import common_pb2, task_assignments_pb2, task_pb2
from fcp_server.services import blob_paths
from fcp_server.services.checkin import Assigned

_GZIP = common_pb2.RESOURCE_COMPRESSION_FORMAT_GZIP


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


def task_assignment(
    assigned: Assigned, *, gzip: bool, local_timeout: int
) -> task_assignments_pb2.TaskAssignment:
    """The device's TaskAssignment for a new assignment."""
    task, rnd, assignment = assigned.task, assigned.round, assigned.assignment
    pop, tid, n = task.population_name, task.task_id, rnd.iteration_id
    compression = _GZIP if gzip else common_pb2.RESOURCE_COMPRESSION_FORMAT_UNSPECIFIED
    proto = task_assignments_pb2.TaskAssignment(
        population_name=pop,
        task_id=str(tid),
        aggregation_id=str(n),
        assignment_id=assignment.id,
        task_name=f"/population/{pop}/task/{tid}",
        self_uri=blob_paths.assignment_path(pop, tid, n, assignment.id),
        plan=common_pb2.Resource(
            uri=blob_paths.plan_download_url(pop, tid),
            client_cache_id=task.client_plan_sha256 or "",
            sha256_checksum=task.client_plan_sha256 or "",
            compression_format=compression,
        ),
        init_checkpoint=common_pb2.Resource(
            uri=blob_paths.checkpoint_download_url(pop, tid, rnd.base_result_id),
            sha256_checksum=rnd.client_checkpoint_sha256 or "",
            compression_format=compression,
        ),
        eligibility_task_info=eligibility_info(task.info_json, n),
    )
    proto.report_deadline.FromDatetime(assignment.created_at + dt.timedelta(seconds=local_timeout))
    return proto
