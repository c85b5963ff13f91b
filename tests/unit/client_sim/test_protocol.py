"""The device API client: retries with backoff, ETag caching, gzip, rejections, retry windows."""

import gzip
import hashlib

import httpx
import numpy as np
import pytest
from google.protobuf import duration_pb2

from client_sim import device, protocol
from fcp_server.protos import common_pb2, task_assignments_pb2


def _client(handler, **kwargs):
    sleeps = []
    http = httpx.Client(transport=httpx.MockTransport(handler), base_url="http://fcp.test")
    api = protocol.DeviceApiClient(
        http, rng=np.random.default_rng(0), sleep=sleeps.append, auth_token="tok", **kwargs
    )
    return api, sleeps


def test_transient_failures_are_retried_with_growing_jittered_backoff():
    calls = []

    def handler(request):
        calls.append(request)
        if len(calls) < 3:
            return httpx.Response(503)
        body = task_assignments_pb2.CreateTaskAssignmentResponse()
        body.task_assignment.assignment_id = "a1"
        return httpx.Response(201, content=body.SerializeToString())

    api, sleeps = _client(handler, retry=protocol.RetryPolicy(max_attempts=4, base_delay=2.0))
    answer = api.check_in("pop", "123")
    assert answer.assignment.assignment_id == "a1"
    assert len(calls) == 3 and api.retries == 2
    assert 1.6 <= sleeps[0] <= 2.4 and 3.2 <= sleeps[1] <= 4.8
    assert calls[0].headers[protocol.AUTH_HEADER] == "tok"
    sent = task_assignments_pb2.CreateTaskAssignmentRequest.FromString(calls[0].content)
    assert sent.client_version.version_code == "123"


def test_retries_are_bounded():
    api, _ = _client(lambda r: httpx.Response(500), retry=protocol.RetryPolicy(max_attempts=2))
    with pytest.raises(protocol.TransientError, match="failed 2 times"):
        api.check_in("pop", "1")


def test_client_errors_are_permanent():
    api, sleeps = _client(lambda r: httpx.Response(404, text="no such population"))
    with pytest.raises(protocol.PermanentError) as info:
        api.check_in("pop", "1")
    assert info.value.status == 404 and not sleeps


def test_rejection_is_returned_with_its_retry_window():
    def handler(request):
        body = task_assignments_pb2.CreateTaskAssignmentResponse()
        body.rejection_info.reason = common_pb2.RejectionReason.NO_TASK_AVAILABLE
        body.rejection_info.retry_window.delay_min.seconds = 60
        body.rejection_info.retry_window.delay_max.seconds = 300
        return httpx.Response(200, content=body.SerializeToString())

    api, _ = _client(handler)
    answer = api.check_in("pop", "1")
    assert answer.assignment is None
    delays = [
        device.rejection_delay(answer.rejection, np.random.default_rng(i)) for i in range(200)
    ]
    assert min(delays) >= 60 and max(delays) <= 300
    assert max(delays) - min(delays) > 150  # spread over the window, not pinned to one end


def test_retry_window_without_bounds_falls_back_to_the_transient_delay():
    window = common_pb2.RetryWindow(delay_max=duration_pb2.Duration(seconds=0))
    delay = device.retry_delay(window, np.random.default_rng(0))
    assert device.TRANSIENT_RETRY[0] <= delay <= device.TRANSIENT_RETRY[1]


def test_download_revalidates_by_etag_and_checks_the_checksum():
    payload = b"plan-bytes" * 100
    digest = hashlib.sha256(payload).hexdigest()
    seen = []

    def handler(request):
        seen.append(request.headers.get("If-None-Match"))
        if request.headers.get("If-None-Match") == f'"{digest}"':
            return httpx.Response(304)
        return httpx.Response(
            200,
            content=gzip.compress(payload),
            headers={"ETag": f'"{digest}"', "Content-Encoding": "gzip"},
        )

    api, _ = _client(handler)
    resource = common_pb2.Resource(uri="/plan", sha256_checksum=digest)
    assert api.download(resource) == payload
    assert api.download(resource) == payload
    assert seen == [None, f'"{digest}"'] and api.cache_hits == 1
    with pytest.raises(protocol.ProtocolError, match="checksum"):
        api.download(common_pb2.Resource(uri="/other", sha256_checksum="00" * 32))


def test_stored_gzip_objects_are_decompressed_with_a_bound():
    blob = gzip.compress(b"x" * 10_000)
    api, _ = _client(lambda r: httpx.Response(200, content=blob))
    gz = common_pb2.Resource(
        uri="/c", compression_format=common_pb2.RESOURCE_COMPRESSION_FORMAT_GZIP
    )
    assert api.download(gz) == b"x" * 10_000
    with pytest.raises(protocol.ProtocolError, match="exceeds"):
        api.download(gz, limit=5_000)


def test_upload_gzips_and_sends_the_instruction_headers():
    got = []

    def handler(request):
        got.append(request)
        return httpx.Response(204)

    api, _ = _client(handler)
    instruction = task_assignments_pb2.UploadInstruction(
        upload_location="/up/1",
        compression_format=common_pb2.RESOURCE_COMPRESSION_FORMAT_GZIP,
        extra_request_headers={"x-extra": "1"},
        max_upload_bytes=10_000,
    )
    api.upload(instruction, b"u" * 5000)
    assert gzip.decompress(got[0].content) == b"u" * 5000
    assert got[0].headers["Content-Encoding"] == "gzip" and got[0].headers["x-extra"] == "1"
    with pytest.raises(protocol.ProtocolError, match="max_upload_bytes"):
        api.upload(instruction, np.random.default_rng(0).bytes(20_000))
