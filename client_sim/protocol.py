"""HTTP client of the device-facing API, as an Android federated compute client speaks it.

Follows the ODP Federated Compute task-assignment API (odp-federatedcompute
`TaskAssignmentController`): check-in with POST `...:create-task-assignment` (201 assignment or
200 rejection with a RetryWindow), PUT `...:report-result` (UploadInstruction or rejection),
then a PUT of the gzip'd update to the upload location; plan and checkpoint GETs with
`Accept-Encoding: gzip` and ETag revalidation. Bodies are binary protobuf; the device token
rides in the `odp-authorization-key` header. Transport errors, 5xx and 429 are retried with
jittered exponential backoff (FCP client: jitter 0.2); other 4xx answers are permanent.
"""

import gzip
import hashlib
import logging
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import numpy as np
from google.protobuf.message import DecodeError

from fcp_server.protos import common_pb2, task_assignments_pb2

_LOG = logging.getLogger(__name__)
PROTO = "application/x-protobuf"
AUTH_HEADER = "odp-authorization-key"
MAX_DOWNLOAD_BYTES = 256 * 1024 * 1024
MAX_RESPONSE_BYTES = 1024 * 1024
_CACHE_ENTRIES = 8


class ProtocolError(Exception):
    """A device API call failed."""


class TransientError(ProtocolError):
    """A network error or a retryable server answer (5xx, 429) after all retries."""


class PermanentError(ProtocolError):
    """A non-retryable answer (4xx other than 429); carries the HTTP status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class RetryPolicy:
    """Retry bounds for transient failures (delays in simulated seconds)."""

    # Attempts per call, the first one included.
    max_attempts: int = 4
    # Delay before the first retry; doubles per retry.
    base_delay: float = 2.0
    # Ceiling of a single delay.
    max_delay: float = 60.0
    # Delays are drawn uniformly in [1 - jitter, 1 + jitter] x target (FCP client: 0.2).
    jitter: float = 0.2


def backoff_delay(attempt: int, policy: RetryPolicy, rng: np.random.Generator) -> float:
    """Jittered exponential delay before retry number `attempt` (1-based)."""
    target = min(policy.max_delay, policy.base_delay * 2.0 ** (attempt - 1))
    return float(target * rng.uniform(1 - policy.jitter, 1 + policy.jitter))


def gunzip_bounded(data: bytes, limit: int) -> bytes:
    """Decompresses gzip data, refusing output larger than `limit` (bomb-safe).

    Raises:
      ProtocolError: for corrupt data or output above the limit.
    """
    d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        out = d.decompress(data, limit + 1)
    except zlib.error as e:
        raise ProtocolError(f"corrupt gzip data: {e}") from e
    if len(out) > limit or d.unconsumed_tail:
        raise ProtocolError(f"decompressed data exceeds {limit} bytes")
    if not d.eof:
        raise ProtocolError("truncated gzip data")
    return out


@dataclass(frozen=True)
class CheckIn:
    """The check-in answer: exactly one of assignment / rejection is set."""

    assignment: task_assignments_pb2.TaskAssignment | None
    rejection: common_pb2.RejectionInfo | None


class DeviceApiClient:
    """One device's connection to the server (its own ETag cache and token)."""

    def __init__(
        self,
        http: httpx.Client,
        *,
        rng: np.random.Generator,
        sleep: Callable[[float], None],
        auth_token: str | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self._http = http
        self._rng = rng
        self._sleep = sleep
        self._token = auth_token
        self._retry = retry or RetryPolicy()
        self._cache: OrderedDict[str, tuple[str, bytes]] = OrderedDict()
        # Counters the fleet summary reads.
        self.retries = 0
        self.cache_hits = 0

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = {"Content-Type": PROTO, "Accept": PROTO}
        if self._token:
            headers[AUTH_HEADER] = self._token
        headers.update(extra or {})
        return headers

    def _send(self, method: str, url: str, **kwargs: object) -> httpx.Response:
        """Sends with retries on transport errors, 5xx and 429."""
        for attempt in range(1, self._retry.max_attempts + 1):
            try:
                resp = self._http.request(method, url, **kwargs)  # type: ignore[arg-type]
            except httpx.TransportError as e:
                problem = f"{type(e).__name__}: {e}"
            else:
                if resp.status_code < 500 and resp.status_code != 429:
                    return resp
                problem = f"HTTP {resp.status_code}"
            if attempt == self._retry.max_attempts:
                raise TransientError(f"{method} {url} failed {attempt} times: {problem}")
            self.retries += 1
            self._sleep(backoff_delay(attempt, self._retry, self._rng))
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _body(resp: httpx.Response, what: str) -> bytes:
        if len(resp.content) > MAX_RESPONSE_BYTES:
            raise ProtocolError(f"{what}: response of {len(resp.content)} bytes is too large")
        return resp.content

    @staticmethod
    def _fail(resp: httpx.Response, what: str) -> PermanentError:
        return PermanentError(
            f"{what}: HTTP {resp.status_code}: {resp.text[:300]}", resp.status_code
        )

    def check_in(self, population: str, version_code: str) -> CheckIn:
        """POSTs CreateTaskAssignmentRequest; 201 -> assignment, 200/401 -> rejection.

        Raises:
          PermanentError / TransientError / ProtocolError on other answers.
        """
        req = task_assignments_pb2.CreateTaskAssignmentRequest(
            client_version=common_pb2.ClientVersion(version_code=version_code),
            resource_capabilities=common_pb2.ResourceCapabilities(
                supported_compression_formats=[common_pb2.RESOURCE_COMPRESSION_FORMAT_GZIP]
            ),
        )
        url = f"/taskassignment/v1/population/{population}:create-task-assignment"
        resp = self._send("POST", url, content=req.SerializeToString(), headers=self._headers())
        if resp.status_code not in (200, 201, 401):
            raise self._fail(resp, "check-in")
        answer = task_assignments_pb2.CreateTaskAssignmentResponse()
        try:
            answer.ParseFromString(self._body(resp, "check-in"))
        except DecodeError as e:
            if resp.status_code == 401:
                raise self._fail(resp, "check-in") from e
            raise ProtocolError(f"check-in: undecodable response: {e}") from e
        kind = answer.WhichOneof("result")
        if resp.status_code == 201 and kind == "task_assignment":
            return CheckIn(answer.task_assignment, None)
        if kind == "rejection_info":
            return CheckIn(None, answer.rejection_info)
        raise ProtocolError(f"check-in: HTTP {resp.status_code} with result {kind!r}")

    def report_result(
        self,
        assignment: task_assignments_pb2.TaskAssignment,
        result: task_assignments_pb2.ReportResultRequest.Result,
    ) -> task_assignments_pb2.ReportResultResponse:
        """PUTs ReportResultRequest to the assignment's report-result path."""
        a = assignment
        url = (
            f"/taskassignment/v1/population/{a.population_name}/task/{a.task_id}"
            f"/aggregation/{a.aggregation_id}/task-assignment/{a.assignment_id}:report-result"
        )
        req = task_assignments_pb2.ReportResultRequest(
            result=result,
            resource_capabilities=common_pb2.ResourceCapabilities(
                supported_compression_formats=[common_pb2.RESOURCE_COMPRESSION_FORMAT_GZIP]
            ),
        )
        resp = self._send("PUT", url, content=req.SerializeToString(), headers=self._headers())
        if resp.status_code != 200:
            raise self._fail(resp, "report-result")
        answer = task_assignments_pb2.ReportResultResponse()
        body = self._body(resp, "report-result")
        try:
            answer.ParseFromString(body)
        except DecodeError as e:
            raise ProtocolError(f"report-result: undecodable response: {e}") from e
        return answer

    def upload(self, instruction: task_assignments_pb2.UploadInstruction, payload: bytes) -> None:
        """PUTs the update (gzip'd when the instruction asks for it) to its upload location.

        Raises:
          ProtocolError: when the compressed body exceeds max_upload_bytes, or on a refusal.
        """
        if not instruction.upload_location:
            raise ProtocolError("upload instruction has no upload_location")
        headers = {"Content-Type": "application/octet-stream"}
        body = payload
        if instruction.compression_format == common_pb2.RESOURCE_COMPRESSION_FORMAT_GZIP:
            body = gzip.compress(payload, compresslevel=6, mtime=0)
            headers["Content-Encoding"] = "gzip"
        headers.update(instruction.extra_request_headers)
        if instruction.max_upload_bytes and len(body) > instruction.max_upload_bytes:
            raise ProtocolError(
                f"update of {len(body)} bytes exceeds max_upload_bytes "
                f"{instruction.max_upload_bytes}"
            )
        resp = self._send(
            "PUT", instruction.upload_location, content=body, headers=self._headers(headers)
        )
        if resp.status_code not in (200, 201, 204):
            raise self._fail(resp, "upload")

    def download(self, resource: common_pb2.Resource, *, limit: int = MAX_DOWNLOAD_BYTES) -> bytes:
        """GETs a plan or checkpoint, revalidating a cached copy by ETag (304 -> cache).

        Raises:
          ProtocolError: on a refusal, oversize data or a sha256 checksum mismatch.
        """
        uri = resource.uri
        if not uri:
            raise ProtocolError("resource has no uri")
        headers = {"Accept-Encoding": "gzip"}
        cached = self._cache.get(uri)
        if cached is not None:
            headers["If-None-Match"] = cached[0]
        resp = self._send("GET", uri, headers=self._headers(headers))
        if resp.status_code == 304 and cached is not None:
            self.cache_hits += 1
            self._cache.move_to_end(uri)
            return cached[1]
        if resp.status_code != 200:
            raise self._fail(resp, f"download {uri}")
        data = resp.content
        if len(data) > limit:
            raise ProtocolError(f"download {uri}: {len(data)} bytes exceed {limit}")
        if (
            resource.compression_format == common_pb2.RESOURCE_COMPRESSION_FORMAT_GZIP
            and data[:2] == b"\x1f\x8b"
        ):
            # The server may hand out the stored gzip object without Content-Encoding.
            data = gunzip_bounded(data, limit)
        if resource.sha256_checksum and hashlib.sha256(data).hexdigest() != (
            resource.sha256_checksum.lower()
        ):
            raise ProtocolError(f"download {uri}: sha256 checksum mismatch")
        etag = resp.headers.get("ETag")
        if etag:
            self._cache[uri] = (etag, data)
            self._cache.move_to_end(uri)
            while len(self._cache) > _CACHE_ENTRIES:
                self._cache.popitem(last=False)
        return data
