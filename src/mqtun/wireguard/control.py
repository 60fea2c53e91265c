"""The configuration socket /var/run/wireguard/IFNAME.sock: the I/O around `uapi`.

wireguard-go's contract: a unix stream socket, mode 0600 (only root configures), in
/var/run/wireguard (0755), one request after another on each connection. `ControlSocket`
accepts and serves connections from a selector loop (`serve` until a stop event), handing
each framed request to a `ControlHandler`: `get()` returns the body of the answer, `set(body)`
applies a set body and returns its `SetResult`.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import stat
import threading
from typing import Protocol

from mqtun.errors import MqtunError
from mqtun.wireguard.uapi import RequestReader, SetResult, response

__all__ = ["SOCKET_DIR", "ControlHandler", "ControlSocket", "socket_path"]

SOCKET_DIR = "/var/run/wireguard"


def socket_path(ifname: str) -> str:
    return os.path.join(SOCKET_DIR, f"{ifname}.sock")


class ControlHandler(Protocol):
    def get(self) -> str: ...

    def set(self, body: str) -> SetResult: ...


class ControlSocket:
    def __init__(self, ifname: str, handler: ControlHandler, *, directory: str = SOCKET_DIR):
        self.path = os.path.join(directory, f"{ifname}.sock")
        self.handler = handler
        os.makedirs(directory, mode=0o755, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            if _socket_in_use(self.path):
                raise MqtunError(98, f"{self.path} is served by another process: is "
                                     f"{ifname} already running?", op="wg")
            os.unlink(self.path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket is created 0600: no window with wider modes
        try:
            self._sock.bind(self.path)
        finally:
            os.umask(old)
        self._sock.listen(16)
        self._sock.setblocking(False)
        self._readers: dict[socket.socket, RequestReader] = {}

    def fileno(self) -> int:
        return self._sock.fileno()

    def serve(self, stop: threading.Event, poll: float = 0.2) -> None:
        """Serve until `stop` is set (checked every `poll` seconds)."""
        with selectors.DefaultSelector() as sel:
            sel.register(self._sock, selectors.EVENT_READ)
            while not stop.is_set():
                for key, _ in sel.select(poll):
                    if key.fileobj is self._sock:
                        with contextlib.suppress(BlockingIOError):
                            conn, _ = self._sock.accept()
                            conn.setblocking(True)
                            conn.settimeout(5)
                            self._readers[conn] = RequestReader()
                            sel.register(conn, selectors.EVENT_READ)
                    else:
                        conn = key.fileobj  # type: ignore[assignment]
                        if not self._serve_one(conn):
                            sel.unregister(conn)
                            self._readers.pop(conn, None)
                            conn.close()

    def _serve_one(self, conn: socket.socket) -> bool:
        """Read what is there and answer complete requests; False when the connection ends."""
        try:
            data = conn.recv(65536)
        except OSError:
            return False
        if not data:
            return False
        for request in self._readers[conn].feed(data):
            if request.operation == "get":
                answer = response(self.handler.get(), 0)
            elif request.operation == "set":
                answer = response("", self.handler.set(request.body).errno)
            else:
                return False
            try:
                conn.sendall(answer)
            except OSError:
                return False
        return True

    def close(self) -> None:
        for conn in self._readers:
            conn.close()
        self._readers.clear()
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def _socket_in_use(path: str) -> bool:
    if not stat.S_ISSOCK(os.stat(path).st_mode):
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True
