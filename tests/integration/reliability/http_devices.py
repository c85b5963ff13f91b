"""Synthetic devices that speak the real device protocol over HTTP and keep a ledger.

The server is what is under test, so the devices are minimal: check in, report COMPLETED,
upload a valid update (testkit's 2-tensor linear model). Every device uses a unique id `uid`
that makes its update distinct (delta `uid_delta(uid)`, loss total `uid`, count 1), so a
double-counted or lost update shows in the round's checkpoint and metrics.

Like a real device (and client_sim), a device retries a call on transport errors and 5xx,
because the server may be restarting. An upload is retried until the server gives a final
answer (204 accepted, or 4xx refused): only then does the device know whether its update
counts, and the ledger records exactly the updates the server acknowledged with 204.
"""

import collections
import dataclasses
import itertools
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

from fcp_server.protos import task_assignments_pb2
from tests.integration.server import testkit

COMPLETED = task_assignments_pb2.ReportResultRequest.COMPLETED
_RETRY_PAUSE_S = 0.1
# Far below the server's retry window, so rounds fill fast, but without flooding it.
_REJECTED_PAUSE_S = 0.5


def uid_delta(uid: int) -> float:
    """The update of device `uid` (every tensor element); norm <= 0.41, below clip 1.0."""
    return 0.001 * (uid % 200 + 1)


class Reply:
    """An httpx response seen through the Flask test-client interface `testkit.Api` uses."""

    def __init__(self, response: httpx.Response) -> None:
        self.status_code = response.status_code
        self.data = response.content
        self.headers = response.headers

    def get_data(self, as_text: bool = False) -> Any:
        return self.data.decode(errors="replace") if as_text else self.data

    def get_json(self) -> Any:
        return httpx.Response(self.status_code, content=self.data).json()


class HttpClient:
    """`post/put/get(url, data=, headers=)` over real HTTP, for `testkit.Api`."""

    def __init__(self, base_url: str, timeout_s: float = 30.0) -> None:
        self._client = httpx.Client(base_url=base_url, timeout=timeout_s)

    def post(self, url: str, data: bytes | None = None, headers: Any = None) -> Reply:
        return Reply(self._client.post(url, content=data, headers=headers))

    def put(self, url: str, data: bytes | None = None, headers: Any = None) -> Reply:
        return Reply(self._client.put(url, content=data, headers=headers))

    def get(self, url: str, headers: Any = None) -> Reply:
        return Reply(self._client.get(url, headers=headers))

    def close(self) -> None:
        self._client.close()


@dataclasses.dataclass(frozen=True)
class Accepted:
    """An update the server acknowledged with 204."""

    task_id: int
    iteration: int
    assignment_id: str
    uid: int


class Ledger:
    """What the devices saw, shared by their threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.accepted: list[Accepted] = []
        self.statuses: collections.Counter[int] = collections.Counter()
        self.transport_errors = 0
        self.server_errors: list[str] = []
        self._uids = itertools.count(1)

    def next_uid(self) -> int:
        with self._lock:
            return next(self._uids)

    def record_status(self, status: int, body: bytes) -> None:
        with self._lock:
            self.statuses[status] += 1
            if status >= 500:
                self.server_errors.append(f"{status}: {body[:300]!r}")

    def record_transport_error(self) -> None:
        with self._lock:
            self.transport_errors += 1

    def record_accepted(self, accepted: Accepted) -> None:
        with self._lock:
            self.accepted.append(accepted)


class _Abandon(Exception):
    """The fleet is stopping and this call may be dropped."""


class Fleet:
    """`size` device threads contributing until `stop()`."""

    def __init__(self, base_url: str, size: int, ledger: Ledger, pop: str = testkit.POP) -> None:
        self._base_url = base_url
        self._pop = pop
        self._ledger = ledger
        self._stop = threading.Event()
        self._abort = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, name=f"device-{i}", daemon=True) for i in range(size)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self, timeout_s: float = 300.0) -> None:
        """Stops starting contributions; in-flight uploads still run to a final answer."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout_s)
            assert not thread.is_alive(), "a device could not finish its upload"

    def abort(self) -> None:
        """Makes every device give up at once, even mid-upload (the servers are gone)."""
        self._abort.set()
        self._stop.set()

    def _call(self, send: Callable[[], Any], *, must_finish: bool = False) -> Any:
        """Sends until the server answers below 500; transport errors and 5xx are retried."""
        while True:
            try:
                result = send()
            except httpx.TransportError:
                self._ledger.record_transport_error()
            else:
                reply = result[0] if isinstance(result, tuple) else result
                self._ledger.record_status(reply.status_code, reply.data)
                if reply.status_code < 500:
                    return result
            if self._abort.is_set() or (self._stop.is_set() and not must_finish):
                raise _Abandon
            time.sleep(_RETRY_PAUSE_S)

    def _run(self) -> None:
        client = HttpClient(self._base_url)
        api = testkit.Api(client)
        try:
            while not self._stop.is_set():
                try:
                    self._contribute(api, self._ledger.next_uid())
                except _Abandon:
                    return
        finally:
            client.close()

    def _contribute(self, api: testkit.Api, uid: int) -> None:
        resp, answer = self._call(lambda: api.checkin(self._pop))
        if resp.status_code != 201:
            time.sleep(_REJECTED_PAUSE_S)  # rejected (round full or closed): come back soon
            return
        a = testkit.Assignment(answer.task_assignment)
        resp, report = self._call(lambda: api.report(a))
        if resp.status_code != 200 or not report.HasField("upload_instruction"):
            return
        location = report.upload_instruction.upload_location
        d = uid_delta(uid)
        data = testkit.update_bytes(d, d, num_examples=1, loss=(float(uid), 1.0))
        up = self._call(lambda: api.upload(location, data), must_finish=True)
        if up.status_code == 204:
            self._ledger.record_accepted(
                Accepted(
                    task_id=int(a.proto.task_id),
                    iteration=int(a.proto.aggregation_id),
                    assignment_id=a.proto.assignment_id,
                    uid=uid,
                )
            )
