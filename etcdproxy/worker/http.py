"""HTTP/1.1 on the gRPC port (like the Go proxy's cmux): /health, /proxy/health, /metrics, /proxy/metrics.

The worker relays the request to the hub, which owns the routes of --metrics-addr (hub/http.py), so both ports
give the same status and body. Without a live hub the answer is 503: the proxy cannot serve then either.
"""

from __future__ import annotations

import asyncio
import itertools

from etcdproxy.ipc import schema as s
from etcdproxy.worker.hubclient import HubClient

TEXT = "text/plain; charset=utf-8"
ANSWER_TIMEOUT_S = 10.0
PATHS = frozenset({"/health", "/proxy/health", "/metrics", "/proxy/metrics"})


class HttpRelay:
    def __init__(self, hub: HubClient) -> None:
        self.hub = hub
        self._ids = itertools.count(1)
        self.waiting: dict[int, asyncio.Future[tuple[int, str, bytes]]] = {}
        hub.handlers[s.Kind.HTTP_ANSWER] = self._on_answer

    async def __call__(self, method: str, path: str) -> tuple[int, str, bytes]:
        if path not in PATHS:
            return 404, TEXT, b"404 page not found\n"
        if method == "HEAD":
            method = "GET"  # the body is dropped by the HTTP/1.1 layer
        epoch = self.hub.epoch
        if not epoch:
            return 503, TEXT, b'{"health":"false","reason":"etcdproxy: hub unavailable"}\n'
        req_id = next(self._ids)
        future = self.hub.loop.create_future()
        self.waiting[req_id] = future
        self.hub.send(s.HttpRequest(epoch, req_id, method, path))
        try:
            return await asyncio.wait_for(future, ANSWER_TIMEOUT_S)
        except TimeoutError:
            return 503, TEXT, b'{"health":"false","reason":"etcdproxy: hub did not answer"}\n'
        finally:
            self.waiting.pop(req_id, None)

    def _on_answer(self, message: s.HttpAnswer) -> None:
        future = self.waiting.get(message.req_id)
        if future is not None and not future.done():
            future.set_result((message.status, message.content_type, message.body))
