"""Code run inside child processes by the concurrency test (importable for `spawn`)."""

from fcp_server.app import create_app, worker_deps
from fcp_server.settings import ServerSettings
from fcp_server.storage.blobs import make_blob_store
from fcp_server.worker import Worker
from tests.integration.server import testkit
from tests.integration.server.testkit import Api


def _app(db_url: str, blob_url: str):
    settings = ServerSettings(
        database_url=db_url, embedded_worker=False, auto_migrate=False, log_format="text"
    )
    return create_app(settings, blobs=make_blob_store(blob_url))


def check_in_many(args: tuple[str, str, int, object]) -> list[str]:
    """Waits at the barrier, then checks in `attempts` times; returns the assignment ids."""
    db_url, blob_url, attempts, barrier = args
    api = Api(_app(db_url, blob_url).test_client())
    barrier.wait()
    assigned = []
    for _ in range(attempts):
        resp, answer = api.checkin()
        if resp.status_code == 201:
            assigned.append(answer.task_assignment.SerializeToString().hex())
    return assigned


def report_and_upload(args: tuple[str, str, list[str], object]) -> list[int]:
    """Reports COMPLETED and uploads for each given assignment; returns the upload statuses."""
    db_url, blob_url, serialized, barrier = args
    api = Api(_app(db_url, blob_url).test_client())
    assignments = [
        testkit.Assignment(testkit.task_assignments_pb2.TaskAssignment.FromString(bytes.fromhex(s)))
        for s in serialized
    ]
    barrier.wait()
    statuses = []
    for a in assignments:
        resp, answer = api.report(a)
        if resp.status_code == 200 and answer.HasField("upload_instruction"):
            statuses.append(
                api.upload(
                    answer.upload_instruction.upload_location, testkit.update_bytes()
                ).status_code
            )
        else:
            statuses.append(-resp.status_code)
    return statuses


def tick(args: tuple[str, str, object]) -> int:
    """One worker tick after the barrier; returns how many rounds it closed."""
    db_url, blob_url, barrier = args
    app = _app(db_url, blob_url)
    loop = Worker(worker_deps(app.extensions["fcp"]))
    barrier.wait()
    return loop.tick().rounds_closed
