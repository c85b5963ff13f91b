"""B4's load generator really runs every client it declares, each on a connection of its own.

A stub HTTP/1.1 server answers 201 and records the client port of every request; B4's jobs
must reach it from LOAD_PROCESSES x LOAD_THREADS distinct keep-alive connections. (B4 has one
path; loadgen used to deal paths round-robin to threads for timed jobs too, which left all but
one thread per process idle, so the "concurrent" benchmark ran two clients.) No timing is
asserted.
"""

import contextlib
import http.server
import threading
from collections.abc import Iterator

from tools.benchmarks import b4_checkins, loadgen


class _Recorder(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as gunicorn answers
    ports: set[int] = set()
    lock = threading.Lock()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        with self.lock:
            self.ports.add(self.client_address[1])
        self.send_response(201)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    request_queue_size = 64  # the default listen backlog (5) drops some of 16 simultaneous connects


@contextlib.contextmanager
def _stub_server() -> Iterator[str]:
    server = _Server(("127.0.0.1", 0), _Recorder)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_every_declared_client_checks_in_on_its_own_connection():
    # Arrange
    _Recorder.ports = set()
    with _stub_server() as url:
        # Act
        outcomes = loadgen.run(b4_checkins.jobs(url, duration=0.5))
    # Assert
    assert sum(o.failed for o in outcomes) == 0
    assert len(_Recorder.ports) == b4_checkins.LOAD_PROCESSES * b4_checkins.LOAD_THREADS
