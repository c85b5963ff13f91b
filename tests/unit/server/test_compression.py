import gzip

import pytest

from fcp_server import errors
from fcp_server.services.compression import gunzip_bounded


def test_round_trip_at_the_exact_limit():
    data = bytes(range(256)) * 100
    assert gunzip_bounded(gzip.compress(data), len(data)) == data


def test_one_byte_over_the_limit_is_too_large():
    data = b"a" * 1000
    with pytest.raises(errors.PayloadTooLarge):
        gunzip_bounded(gzip.compress(data), 999)


def test_bomb_is_stopped_without_inflating_it():
    bomb = gzip.compress(b"\0" * (32 * 1024 * 1024), compresslevel=1)
    assert len(bomb) < 256 * 1024
    with pytest.raises(errors.PayloadTooLarge):
        gunzip_bounded(bomb, 1024 * 1024)


@pytest.mark.parametrize(
    "body",
    # mtime=0 keeps the ids identical across pytest-xdist workers.
    [
        b"",
        b"plain text",
        gzip.compress(b"x" * 100, mtime=0)[:-5],
        gzip.compress(b"x", mtime=0) + b"trailing",
    ],
)
def test_malformed_gzip_is_an_invalid_upload(body):
    with pytest.raises(errors.InvalidUpload):
        gunzip_bounded(body, 10_000)
