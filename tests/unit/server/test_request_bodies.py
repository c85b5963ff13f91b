"""Request bodies: exact bytes, bounds, and device updates kept off the Python heap."""

import io
import mmap
import os
import pathlib
import tracemalloc

import flask
import pytest
from werkzeug.exceptions import BadRequest as WerkzeugBadRequest

from fcp_server import errors
from fcp_server.api import bodies

# More than two read steps, and not a multiple of one.
LARGE = 2 * (1 << 20) + 12_345


@pytest.fixture(scope="module")
def app() -> flask.Flask:
    return flask.Flask(__name__)


def _declared(app: flask.Flask, body: bytes):
    return app.test_request_context("/", method="PUT", data=body)


def _chunked(app: flask.Flask, body: bytes):
    # As gunicorn passes a chunked request: no Content-Length, a terminated input stream.
    return app.test_request_context(
        "/",
        method="PUT",
        input_stream=io.BytesIO(body),
        headers={"Transfer-Encoding": "chunked"},
        environ_overrides={"wsgi.input_terminated": True},
    )


@pytest.mark.parametrize("framing", [_declared, _chunked], ids=["content-length", "chunked"])
@pytest.mark.parametrize("size", [1, 4096, LARGE])
def test_an_update_is_read_exactly_into_a_read_only_mapping(app, framing, size):
    body = os.urandom(size)
    with framing(app, body):
        view = bodies.read_update(max_bytes=LARGE)
    assert view.tobytes() == body
    assert view.readonly
    assert isinstance(view.obj, mmap.mmap)


@pytest.mark.parametrize("framing", [_declared, _chunked], ids=["content-length", "chunked"])
def test_an_empty_update_reads_as_empty(app, framing):
    with framing(app, b""):
        assert bodies.read_update(max_bytes=10).tobytes() == b""


@pytest.mark.parametrize("framing", [_declared, _chunked], ids=["content-length", "chunked"])
def test_an_update_over_the_bound_is_refused(app, framing):
    with framing(app, b"x" * 1001), pytest.raises(errors.PayloadTooLarge, match="1000"):
        bodies.read_update(max_bytes=1000)


def test_an_update_shorter_than_its_content_length_is_a_bad_request(app):
    truncated = app.test_request_context(
        "/",
        method="PUT",
        input_stream=io.BytesIO(b"x" * 50),
        environ_overrides={"CONTENT_LENGTH": "100"},
    )
    # werkzeug's stream reports the early end itself (400); ours covers other streams.
    with truncated, pytest.raises((errors.BadRequest, WerkzeugBadRequest)):
        bodies.read_update(max_bytes=1000)


def _heap_peak(read) -> int:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        read()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("framing", [_declared, _chunked], ids=["content-length", "chunked"])
def test_reading_an_update_puts_no_body_sized_buffer_on_the_heap(app, framing):
    body = os.urandom(LARGE)
    with framing(app, body):
        # Chunked bodies are gathered in read steps before their size is known; a declared
        # one goes straight into its mapping.
        limit = LARGE // 2 if framing is _declared else LARGE + (1 << 20)
        peak = _heap_peak(lambda: bodies.read_update(max_bytes=LARGE))
    assert peak < limit


def test_a_small_message_does_not_allocate_its_bound(app):
    # Reading up to the bound made the stream allocate a bound-sized buffer for every message.
    with _declared(app, b"m" * 100):
        peak = _heap_peak(lambda: bodies.read_body(max_bytes=8 << 20))
    assert peak < 1 << 20


def test_read_body_returns_the_bytes_within_the_bound(app):
    with _declared(app, b"hello"):
        assert bodies.read_body(max_bytes=5) == b"hello"
    with _chunked(app, b"hello!"), pytest.raises(errors.PayloadTooLarge):
        bodies.read_body(max_bytes=5)


def _resident_bytes() -> int:
    status = pathlib.Path("/proc/self/status").read_text().splitlines()
    return int(next(line.split()[1] for line in status if line.startswith("VmRSS:"))) * 1024


@pytest.mark.skipif(not pathlib.Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_an_update_buffer_holds_memory_only_for_the_bytes_that_arrived():
    # A client may declare a large Content-Length and send nothing: that must not commit memory.
    before = _resident_bytes()
    view = bodies.mapped_buffer(256 << 20)
    assert _resident_bytes() - before < 16 << 20
    view[: 64 << 20] = b"\x01" * (64 << 20)  # what 64 MiB of received body makes resident
    assert _resident_bytes() - before > 48 << 20
