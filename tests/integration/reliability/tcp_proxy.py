"""A small TCP proxy for fault tests: forward, cut, stall or slow the path to a dependency.

It listens on a free loopback port and forwards every connection to `upstream`. A test puts
it between the server and PostgreSQL or the GCS emulator and then:

* `cut()`: closes every open connection and answers new ones by closing them at once (the
  dependency is gone: connection reset, "server closed the connection unexpectedly");
* `stall()`: keeps connections open but forwards nothing (a hung dependency: timeouts);
* `delay(s)`: forwards each chunk after `s` seconds (a slow dependency);
* `restore()`: forwards normally again.

Threads only (one acceptor, one pump per connection), all ended by `close()`.
"""

import contextlib
import selectors
import socket
import threading
import time

_CHUNK = 65536


class TcpProxy:
    """See the module docstring."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self._upstream = (upstream_host, upstream_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._mode = "forward"
        self._delay_s = 0.0
        self._closed = threading.Event()
        self._threads = [threading.Thread(target=self._accept, name="proxy-accept", daemon=True)]
        self._threads[0].start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def cut(self) -> None:
        with self._lock:
            self._mode = "cut"
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            _close(*pair)

    def stall(self) -> None:
        with self._lock:
            self._mode = "stall"

    def delay(self, seconds: float) -> None:
        with self._lock:
            self._mode, self._delay_s = "forward", seconds

    def restore(self) -> None:
        with self._lock:
            self._mode, self._delay_s = "forward", 0.0

    def close(self) -> None:
        self._closed.set()
        self.cut()
        self._listener.close()
        for thread in self._threads:
            thread.join(5)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # listener closed
            with self._lock:
                mode = self._mode
            if mode == "cut":
                _close(client)
                continue
            try:
                upstream = socket.create_connection(self._upstream, timeout=5)
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._pairs.append((client, upstream))
            thread = threading.Thread(
                target=self._pump, args=(client, upstream), name="proxy-pump", daemon=True
            )
            self._threads.append(thread)
            thread.start()

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        peer = {client: upstream, upstream: client}
        with selectors.DefaultSelector() as selector:
            for sock in peer:
                sock.setblocking(True)
                selector.register(sock, selectors.EVENT_READ)
            while not self._closed.is_set():
                with self._lock:
                    mode, delay_s, alive = (
                        self._mode,
                        self._delay_s,
                        (client, upstream) in self._pairs,
                    )
                if not alive:
                    return
                if mode == "stall":
                    time.sleep(0.02)
                    continue
                try:
                    for key, _ in selector.select(timeout=0.05):
                        data = key.fileobj.recv(_CHUNK)  # type: ignore[union-attr]
                        if not data:
                            return self._drop(client, upstream)
                        if delay_s:
                            time.sleep(delay_s)
                        peer[key.fileobj].sendall(data)  # type: ignore[index]
                except OSError:
                    return self._drop(client, upstream)

    def _drop(self, client: socket.socket, upstream: socket.socket) -> None:
        with self._lock:
            if (client, upstream) in self._pairs:
                self._pairs.remove((client, upstream))
        _close(client, upstream)


def _close(*socks: socket.socket) -> None:
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            sock.close()
