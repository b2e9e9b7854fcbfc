"""A loopback TCP relay that can break the link it carries: for failover tests.

``Relay(target_port)`` listens on a free loopback port and copies bytes both ways. Its mode
can change at any time:

* ``pass``: copy (each chunk after ``delay_s``, if set: a slow link);
* ``blackhole``: keep every connection open but drop all bytes both ways, and accept new
  connections that then hear nothing (a silent partition: only keepalive pings notice; once
  one end closes, the relay closes the other);
* ``reset``: close every connection with RST and reset new ones at once (a crashed peer).

``cut_off(sender)`` blackholes, whatever the mode, the connections whose HTTP request names
``sender`` in etcd's ``X-Server-From`` peer header: with a relay in front of every member's
peer port, that isolates one member from the others in both directions (etcd peers dial each
other both ways, so blocking only the isolated member's own port would not do).
"""

from __future__ import annotations

import contextlib
import re
import socket
import struct
import threading
import time

PASS, BLACKHOLE, RESET = "pass", "blackhole", "reset"
_SENDER = re.compile(rb"\r\nX-Server-From: ([0-9a-f]+)\r\n", re.IGNORECASE)


def _rst(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()


class Relay:
    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self.target = (host, target_port)
        self.mode = PASS
        self.delay_s = 0.0
        self.accepted = 0
        self.cut: set[str] = set()
        self._sender: dict[socket.socket, str] = {}  # client socket -> etcd member id it named
        self._sockets: list[socket.socket] = []  # every socket made, all closed by close()
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._closed = False
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, 0))
        self._listener.listen(64)
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, name=f"relay-{self.port}", daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"{self.target[0]}:{self.port}"

    def open_connections(self) -> int:
        with self._lock:
            return len(self._pairs)

    def cut_off(self, sender: str) -> None:
        self.cut.add(sender)

    def _silenced(self, client: socket.socket) -> bool:
        return self.mode == BLACKHOLE or self._sender.get(client, "") in self.cut

    def set_mode(self, mode: str) -> None:
        self.mode = mode
        if mode == RESET:
            with self._lock:
                pairs, self._pairs = self._pairs, []
            for a, b in pairs:
                _rst(a)
                _rst(b)

    def close(self) -> None:
        self._closed = True
        self.set_mode(RESET)
        self._thread.join(timeout=2)
        self._listener.close()
        for sock in self._sockets:  # pumps may still be in their 0.2 s receive wait
            _rst(sock)

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self.mode == RESET:
                _rst(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=2)
            except OSError:
                _rst(client)
                continue
            self.accepted += 1
            self._sockets = [sock for sock in self._sockets if sock.fileno() != -1] + [client, upstream]
            with self._lock:
                self._pairs.append((client, upstream))
            try:
                for sock in (client, upstream):
                    sock.settimeout(0.2)
            except OSError:  # closed meanwhile by close()
                continue
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst, client), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, client: socket.socket) -> None:
        try:
            while not self._closed:
                try:
                    data = src.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    break
                if src is client and client not in self._sender:
                    found = _SENDER.search(data)
                    self._sender[client] = found.group(1).decode().lower() if found else ""
                if self._silenced(client):
                    continue  # swallowed: the peer hears nothing, and nothing is closed
                if self.delay_s:
                    time.sleep(self.delay_s)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._pairs = [p for p in self._pairs if src not in p]
            # One side ended: end the other (gRPC never half-closes TCP), silenced or not. A silenced pair
            # whose dialer gave up would otherwise keep its other pump and two sockets for good, and etcd
            # peers redial a partition many times a second: a CI run hung with 5,800 pump threads
            # fighting over the GIL, too starved for pytest-timeout to fire. Nothing of the silenced
            # bytes is let through: the other side only learns that the connection ended.
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
