"""`task_builder_client`: builds (and registers) the tasks a TaskConfig describes.

The flags of ODP's `task_builder_client.py` (odp-federated-compute.md section 1.2). By default
the config is read here and a BuildTaskRequest is POSTed to the task-builder service; with
--local the build runs in this process and registers with the FCP server at --server. Unlike
the reference, any build error is printed and the exit code is non-zero (1; 2 for bad flags).
The --warm_start_* flags (added) start training from a stored round of an earlier task; a
remote build may leave out --warm_start_blob_url, as the service reads only its own store.
"""

import argparse
import sys
from collections.abc import Sequence

import httpx
from google.protobuf import text_format
from google.protobuf.message import DecodeError

from fcp_server.protos import common_pb2, task_builder_pb2
from task_builder import builder, registration, report, task_config, tff_runtime
from task_builder.errors import TaskBuilderError

_PROTO = "application/x-protobuf"
_REMOTE_TIMEOUT_SECONDS = 1800.0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses the reference's flags plus --local, --server and --warm_start_* (exit 2 if bad)."""
    p = argparse.ArgumentParser(prog="task_builder_client", description=__doc__.splitlines()[0])
    p.add_argument("--saved_model", required=True, help="saved FunctionalModel: path or gs://")
    p.add_argument("--task_config", required=True, help="text TaskConfig: path, file:// or gs://")
    p.add_argument("--task_builder_server", default="http://localhost:5000/")
    flag = argparse.BooleanOptionalAction
    p.add_argument("--build_artifact_only", action=flag, default=False)
    p.add_argument("--skip_flex_ops_check", action=flag, default=False)
    p.add_argument("--skip_dp_check", action=flag, default=False)
    p.add_argument("--skip_dp_aggregator", action=flag, default=False)
    p.add_argument("--population_name", default=None, help="overrides task_config.population_name")
    p.add_argument(
        "--api_key", default=None, help="builder key (?key=); with --local the admin key"
    )
    p.add_argument("--local", action=flag, default=False, help="build in this process")
    p.add_argument("--server", default="http://localhost:8080", help="FCP server (with --local)")
    ws = p.add_argument_group("warm start", "start from a stored round of an earlier task")
    ws.add_argument("--warm_start_blob_url", default=None, help="the FCP server's blob store")
    ws.add_argument("--warm_start_population", default=None, help="the earlier task's population")
    ws.add_argument("--warm_start_task", type=int, default=None, help="the earlier task's id")
    ws.add_argument("--warm_start_round", type=int, default=None, help="default: latest round")
    args = p.parse_args(argv)
    problem = warm_start_flag_error(args)
    if problem:
        p.error(problem)
    return args


def warm_start_flag_error(args: argparse.Namespace) -> str | None:
    """Why the --warm_start_* flags are inconsistent, or None when they are usable."""
    required = {
        "--warm_start_population": args.warm_start_population,
        "--warm_start_task": args.warm_start_task,
    }
    # A remote service reads only its configured store, so the URL is needed only locally.
    if args.local:
        required["--warm_start_blob_url"] = args.warm_start_blob_url
    given = [args.warm_start_blob_url, args.warm_start_round, *required.values()]
    if all(v is None for v in given):
        return None
    missing = [flag for flag, value in required.items() if value is None]
    if missing:
        return (
            f"warm start needs all of {', '.join(sorted(required))}; missing {', '.join(missing)}"
        )
    if args.warm_start_task <= 0:
        return f"--warm_start_task must be a positive task id, got {args.warm_start_task}"
    if args.warm_start_round is not None and args.warm_start_round < 0:
        return f"--warm_start_round must be >= 0, got {args.warm_start_round}"
    return None


def _warm_start(args: argparse.Namespace) -> task_builder_pb2.WarmStart | None:
    if args.warm_start_task is None:
        return None
    return task_builder_pb2.WarmStart(
        blob_url=args.warm_start_blob_url or "",
        population_name=args.warm_start_population,
        task_id=args.warm_start_task,
        round=args.warm_start_round,
    )


def make_request(args: argparse.Namespace) -> task_builder_pb2.BuildTaskRequest:
    """Reads the TaskConfig and assembles the BuildTaskRequest the flags describe."""
    config = task_config.override_population(
        task_config.load_task_config(args.task_config), args.population_name
    )
    return task_builder_pb2.BuildTaskRequest(
        saved_model=common_pb2.Resource(uri=args.saved_model),
        task_config=config,
        flags=task_builder_pb2.ExperimentFlags(
            skip_flex_ops_check=args.skip_flex_ops_check,
            skip_dp_check=args.skip_dp_check,
            skip_dp_aggregator=args.skip_dp_aggregator,
        ),
        warm_start=_warm_start(args),
    )


def build_locally(
    request: task_builder_pb2.BuildTaskRequest, args: argparse.Namespace
) -> task_builder_pb2.BuildTaskResponse:
    """Runs the pipeline in this process (registering with --server unless artifact-only)."""
    if args.build_artifact_only:
        return builder.build_response(request, artifact_only=True, server=None)[0]
    with registration.TaskManagementClient(args.server, api_key=args.api_key) as server:
        return builder.build_response(request, artifact_only=False, server=server)[0]


def build_remotely(
    request: task_builder_pb2.BuildTaskRequest, args: argparse.Namespace
) -> task_builder_pb2.BuildTaskResponse:
    """POSTs the request to the task-builder service and decodes its BuildTaskResponse.

    Raises:
      TaskBuilderError: when the service cannot be reached or answers without a response body.
    """
    verb = "build-artifacts" if args.build_artifact_only else "build-task-group"
    url = args.task_builder_server.rstrip("/") + f"/taskbuilder/v1:{verb}"
    params = {"key": args.api_key} if args.api_key else None
    try:
        reply = httpx.post(
            url,
            content=request.SerializeToString(),
            params=params,
            headers={"content-type": _PROTO, "accept": _PROTO},
            timeout=_REMOTE_TIMEOUT_SECONDS,
        )
    except httpx.HTTPError as e:
        raise TaskBuilderError(f"cannot reach the task builder at {url}: {e}") from e
    if reply.headers.get("content-type", "").startswith(_PROTO):
        try:
            return task_builder_pb2.BuildTaskResponse.FromString(reply.content)
        except DecodeError:
            pass
    raise TaskBuilderError(f"{reply.status_code}: {reply.reason_phrase}: {reply.text[:500]}")


def main(argv: Sequence[str] | None = None) -> int:
    """Builds the tasks; prints the report (exit 0) or the error (exit 1)."""
    args = parse_args(argv)
    # TFF computations leave a worker_binary child; end it when this process exits.
    tff_runtime.install_reaper()
    try:
        request = make_request(args)
        response = build_locally(request, args) if args.local else build_remotely(request, args)
    except TaskBuilderError as e:
        print(f"Build failed: {e}", file=sys.stderr)
        return 1
    if response.HasField("error_info"):
        info = response.error_info
        kind = task_builder_pb2.ErrorType.Enum.Name(info.error_type)
        print(f"Build failed ({kind}): {info.error_message}", file=sys.stderr)
        if response.HasField("task_report"):
            print(text_format.MessageToString(response.task_report), file=sys.stderr)
        return 1
    print(report.format_report(response.task_report))
    print(text_format.MessageToString(response.task_group))
    return 0


if __name__ == "__main__":
    sys.exit(main())
