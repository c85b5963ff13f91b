"""The simulated device network: an httpx transport that loses a share of requests.

Mobile networks drop connections; the device's protocol client must retry with backoff.
`FlakyTransport` wraps the real transport (HTTP to a server process, or WSGI in-process) and
fails a request with `httpx.ConnectError` with the configured probability before it is sent,
so the failure exercises the client's real retry path and never reaches the server.
"""

import threading

import httpx
import numpy as np


class FlakyTransport(httpx.BaseTransport):
    """Fails each request with probability `error_rate`, otherwise forwards it."""

    def __init__(
        self, inner: httpx.BaseTransport, *, error_rate: float, rng: np.random.Generator
    ) -> None:
        if not 0.0 <= error_rate <= 1.0:
            raise ValueError(f"error_rate must be in [0, 1]: {error_rate}")
        self._inner = inner
        self._rate = error_rate
        self._rng = rng
        self._lock = threading.Lock()
        # Number of requests this transport failed on purpose.
        self.injected = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Sends the request, or raises ConnectError as a lost connection would."""
        with self._lock:
            fail = self._rate > 0 and self._rng.random() < self._rate
            if fail:
                self.injected += 1
        if fail:
            raise httpx.ConnectError("simulated network failure", request=request)
        return self._inner.handle_request(request)

    def close(self) -> None:
        """Leaves the shared inner transport open; the fleet closes it once."""
